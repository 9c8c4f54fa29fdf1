"""Library-wide settings, as lazycluster's ``Environment`` had them, and its two log helpers."""

from __future__ import annotations

import logging
import os
import time

from lazycluster_tasks.settings import settings

THIRD_PARTY_LOGGERS = ("paramiko", "sshtunnel", "distributed", "asyncio")


class Environment:
    """Where execution logs go, and how loud third-party libraries are."""

    #: Folder for execution log files (``<main>/execution_log/<host>/<task>_<time>.log``).
    main_directory: str = settings().main_directory  # LAZYCLUSTER_MAIN_DIR
    #: The level last given to ``set_third_party_log_level`` (loggers keep their own otherwise).
    third_party_log_level: int | None = None
    #: Always False: nothing is ever installed on a host (see the README's API coverage).
    use_dev_version: bool = False

    @classmethod
    def set_main_directory(cls, dir: str) -> None:
        """Use ``dir`` (relative paths are made absolute, ``~`` is expanded) as main folder."""
        if not isinstance(dir, (str, os.PathLike)) or not str(dir).strip():
            raise ValueError(f"dir must be a non-empty path, got {dir!r}")
        cls.main_directory = os.path.abspath(os.path.expanduser(dir))

    @classmethod
    def get_main_directory(cls) -> str:
        return cls.main_directory

    @classmethod
    def execution_log_dir(cls, host: str) -> str:
        return os.path.join(cls.main_directory, "execution_log", host)

    @classmethod
    def set_third_party_log_level(cls, log_level: int) -> None:
        """Set the level of the loggers of paramiko, sshtunnel, distributed and asyncio."""
        for name in THIRD_PARTY_LOGGERS:
            logging.getLogger(name).setLevel(log_level)
        cls.third_party_log_level = log_level


class Timestamp:
    """The local time of its creation, fixed-width with or without separators."""

    def __init__(self) -> None:
        self._time = time.localtime()

    def get_unformatted(self) -> str:
        """``yyyymmddhhmmss``."""
        return time.strftime("%Y%m%d%H%M%S", self._time)

    def get_formatted(self) -> str:
        """``yyyy-mm-dd hh:mm:ss``."""
        return time.strftime("%Y-%m-%d %H:%M:%S", self._time)


class ExecutionFileLogUtil:
    """The execution log file of one task run on one host:
    ``<main dir>/execution_log/<host>/<task>_<yyyymmddhhmmss>.log``."""

    def __init__(self, runtime_host: str, taskname: str) -> None:
        self.runtime_host = runtime_host
        self.taskname = taskname
        self.file_extension = "log"
        self._created = Timestamp()

    @property
    def directory_path(self) -> str:
        """The host's log folder (created when missing)."""
        path = Environment.execution_log_dir(_safe_name(self.runtime_host))
        os.makedirs(path, exist_ok=True)
        return path

    @property
    def file_path(self) -> str:
        """The log file's path (the file itself is written when the task runs)."""
        name = f"{_safe_name(self.taskname)}_{self._created.get_unformatted()}"
        return os.path.join(self.directory_path, f"{name}.{self.file_extension}")

    def get_write_mode(self) -> str:
        """``a`` when the file exists (append), else ``w+``."""
        return "a" if os.path.exists(self.file_path) else "w+"


def _safe_name(name: str) -> str:
    """A file name from free text: anything but letters, digits and ``-_.`` becomes ``_``."""
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in str(name))
    return "_" if safe in ("", ".", "..") else safe
