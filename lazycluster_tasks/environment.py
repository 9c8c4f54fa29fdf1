"""Library-wide settings, as lazycluster's ``Environment`` had them."""

from __future__ import annotations

import logging
import os

THIRD_PARTY_LOGGERS = ("paramiko", "sshtunnel", "distributed", "asyncio")


class Environment:
    """Where execution logs go, and how loud third-party libraries are."""

    #: Folder for execution log files (``<main>/execution_log/<host>/<task>_<time>.log``).
    main_directory: str = os.path.expanduser(
        os.environ.get("LAZYCLUSTER_MAIN_DIR", "~/.lazycluster")
    )

    @classmethod
    def set_main_directory(cls, path: str) -> None:
        cls.main_directory = os.path.abspath(os.path.expanduser(path))

    @classmethod
    def get_main_directory(cls) -> str:
        return cls.main_directory

    @classmethod
    def execution_log_dir(cls, host: str) -> str:
        return os.path.join(cls.main_directory, "execution_log", host)

    @classmethod
    def set_third_party_log_level(cls, level: int) -> None:
        for name in THIRD_PARTY_LOGGERS:
            logging.getLogger(name).setLevel(level)
