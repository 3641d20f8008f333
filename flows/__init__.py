"""The CLI and the Prefect flows. Importing the package installs the Prefect block reader, so
`*_block` credentials in a configuration resolve (`flows/blocks.py`, `config.secrets`)."""

from flows.blocks import install as _install_block_reader

_install_block_reader()
