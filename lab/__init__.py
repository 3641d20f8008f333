"""The lab's own data: what `exitplan lab seed` writes into the emulators (`lab.seed`).

Not migration code: nothing in `engine` or `connectors` imports it. It writes through the
connectors (`connectors.azure_writer`, `connectors.s3`) and never imports prefect or the flows
(`tests/unit/test_layout.py`).
"""
