"""The contract suite: the same cases over every connector (memory, Azurite, the S3 server)."""
