"""The lab's well-known, non-secret values, shared by the lab commands and the config loader.

Azurite's development account and key are published by Microsoft for the emulator; the lab's S3
server accepts any credentials; the lab's sshd lets in only the key it generated in the lab directory. None of these open anything outside 127.0.0.1.
"""

from __future__ import annotations

import os

LOOPBACK = "127.0.0.1"
AZURITE_ACCOUNT = "devstoreaccount1"
AZURITE_KEY = "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw=="
LAB_S3_ACCESS_KEY = "exitplan-lab"
LAB_S3_SECRET_KEY = "exitplan-lab-secret"
LAB_REGION = "eu-west-3"
LAB_BUCKET = "exitplan-lab"

DEFAULT_PORTS = {"azurite": 10000, "s3": 5000, "sftp": 2222, "prefect": 4200}
PORT_ENV = {
    "azurite": "EXITPLAN_LAB_AZURITE_PORT",
    "s3": "EXITPLAN_LAB_S3_PORT",
    "sftp": "EXITPLAN_LAB_SFTP_PORT",
    "prefect": "EXITPLAN_LAB_PREFECT_PORT",
}
# The lab's sshd: its directory (host key, user key, known_hosts, the served `root/`) below the lab
# directory, and the variables `exitplan lab env` exports for config/examples/lab.yaml.
LAB_SFTP_SUBDIR = "sftp"
SFTP_DIR_ENV = "EXITPLAN_LAB_SFTP_DIR"
SFTP_USER_ENV = "EXITPLAN_LAB_SFTP_USER"
# The partner-delivery dataset `exitplan lab seed` writes below the sshd's root.
LAB_DELIVERIES = "deliveries"
# The names of `lab.seed.PROFILES`, for the commands' `--profile` choices: the CLI is built on
# every command, and the seed module is not imported for it (tests/unit keep the two equal).
SEED_PROFILES = ("tiny", "standard", "bench")


def lab_port(name: str) -> int:
    """The lab port of `name` ("azurite", "s3", "sftp", "prefect"), honouring the EXITPLAN_LAB_*_PORT overrides."""
    value = os.environ.get(PORT_ENV[name])
    return int(value) if value else DEFAULT_PORTS[name]


def azurite_connection_string(port: int | None = None) -> str:
    port = lab_port("azurite") if port is None else port
    return (
        "DefaultEndpointsProtocol=http;"
        f"AccountName={AZURITE_ACCOUNT};AccountKey={AZURITE_KEY};"
        f"BlobEndpoint=http://{LOOPBACK}:{port}/{AZURITE_ACCOUNT};"
    )
