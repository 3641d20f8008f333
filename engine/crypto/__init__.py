"""Encryption: the on-object format (Tink streaming AEAD) and the data keys it uses."""
