"""Building blocks for cross-silo deployment (SuperLink + SuperNodes).

Only :mod:`fedtune.deploy.worker` (the long-lived ClientApp process beside a
SuperNode) and :mod:`fedtune.deploy.supernode` (Flower's SuperNode with shorter
polling) import ``flwr``, and each runs as a process of its own; the deployment
commands these files feed are described in ``docs/deploy-notes.md``.
"""

from fedtune.deploy.certs import (
    CAFiles,
    ServerCertFiles,
    SupernodeKeyFiles,
    create_ca,
    create_server_cert,
    create_supernode_keys,
)

__all__ = [
    "CAFiles",
    "ServerCertFiles",
    "SupernodeKeyFiles",
    "create_ca",
    "create_server_cert",
    "create_supernode_keys",
]
