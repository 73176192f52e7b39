"""Settings and the TOML file they live in (the chat app's config and the launcher's --config files).

One format for both, so a configuration saved from the app can be launched headless and back:

    [models]    main, draft ("" = the demo pair / its default), dirs
    [settings]  sampling, speculative and hardware settings (the CLI flags' names)
    [default_drafts]  main-model path = draft choice (LM Studio's per-model default draft)
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import stat
import time
import tomllib
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, ClassVar

import platformdirs

from app.engine.controller import DRAFT_P_MIN
from app.engine.errors import TandemError
from app.engine.rpc import parse_endpoints, parse_split
from app.engine.sampling import SamplerSettings
from app.engine.speculative import GenerationConfig


class ConfigError(TandemError):
    pass


@dataclass
class Settings:
    temperature: float = 0.8
    top_k: int = 40
    top_p: float = 0.95
    min_p: float = 0.05
    repeat_penalty: float = 1.0
    max_tokens: int = 512
    seed: int = -1  # -1: a new seed every reply
    draft_max: int = 16  # llama.cpp's default; the adaptive controller picks the length per round
    draft_min: int = 0
    draft_p_min: float = DRAFT_P_MIN
    adaptive: bool = True
    exact: bool = False  # kernels chosen for output identical to plain decoding, at some speed (see README)
    gpu_layers: int = -1  # -1: all layers of the main model on the GPU (when there is one)
    draft_on_gpu: bool = True
    ctx_size: int = 4096
    threads: int = os.cpu_count() or 1
    system: str = ""
    rpc: str = ""  # HOST:PORT[,HOST:PORT...]: the main model's layers on llama.cpp RPC workers (app/engine/rpc.py)
    tensor_split: str = ""  # the workers' (and GPUs') shares of those layers, "3,1"; empty: by their free memory

    # limits a value must respect: (lowest, highest); None means unbounded
    LIMITS: ClassVar[dict[str, tuple[float | None, float | None]]] = {
        "temperature": (0.0, None), "top_k": (0, None), "top_p": (0.0, 1.0), "min_p": (0.0, 1.0),
        "repeat_penalty": (0.01, None), "max_tokens": (1, None), "seed": (-1, None), "draft_max": (0, 64),
        "draft_min": (0, 64), "draft_p_min": (0.0, 1.0), "gpu_layers": (-1, None), "ctx_size": (16, None),
        "threads": (1, 512),
        "parallel": (1, 64),  # --serve --parallel (not a stored setting): replies generated together
    }  # fmt: skip

    # text settings with a form: (the rule that reads them, the form in words)
    FORMATS: ClassVar[dict[str, tuple[Callable[[str], object], str]]] = {
        "rpc": (parse_endpoints, "HOST:PORT worker addresses, comma-separated (empty: this machine)"),
        "tensor_split": (parse_split, "shares such as 3,1 (empty: by free memory)"),
    }

    def set(self, name: str, value: Any) -> None:
        """Set one setting from a config value or a form field, checking type and range."""
        kinds = {f.name: f.type for f in fields(self)}
        if name not in kinds:
            raise ConfigError(f"unknown setting '{name}'")
        kind = kinds[name]
        try:
            if kind == "bool":
                if isinstance(value, str):
                    value = {"true": True, "on": True, "yes": True, "false": False, "off": False, "no": False}[value.strip().lower()]
                elif not isinstance(value, bool):
                    raise ValueError
            elif kind == "int":
                if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                    raise ValueError
                value = int(value)
            elif kind == "float":
                if isinstance(value, bool):
                    raise ValueError
                value = float(value)
                if not math.isfinite(value):
                    raise ValueError
            else:
                value = str(value)
        except (ValueError, KeyError, TypeError):
            raise ConfigError(f"setting '{name}' must be a {kind}, got {value!r}") from None
        if name in self.FORMATS:
            try:
                self.FORMATS[name][0](value)
            except TandemError:
                raise ConfigError(f"setting '{name}' must be {self.FORMATS[name][1]}, got {value!r}") from None
        low, high = self.LIMITS.get(name, (None, None))
        if (low is not None and value < low) or (high is not None and value > high):
            bounds = f"at least {low}" if high is None else f"between {low} and {high}"
            raise ConfigError(f"setting '{name}' must be {bounds}, got {value}")
        setattr(self, name, value)

    def check(self) -> None:
        """Rules between settings, checked once all are set (a file or form may set them in any order)."""
        if self.draft_min > self.draft_max:
            raise ConfigError(f"draft_min ({self.draft_min}) is larger than draft_max ({self.draft_max})")


    def generation_config(self, stop: tuple[str, ...] = ()) -> GenerationConfig:
        """What the engine needs for one reply (the CLI, the chat app and --benchmark all use this)."""
        sampler = SamplerSettings(
            temperature=self.temperature, top_k=self.top_k, top_p=self.top_p, min_p=self.min_p,
            repeat_penalty=self.repeat_penalty, seed=None if self.seed < 0 else self.seed,
        )  # fmt: skip
        return GenerationConfig(
            max_tokens=self.max_tokens, draft_max=self.draft_max, draft_min=self.draft_min,
            draft_p_min=self.draft_p_min, stop=stop, sampler=sampler, adaptive=self.adaptive,
        )  # fmt: skip


@dataclass
class Config:
    settings: Settings = field(default_factory=Settings)
    main: str = ""  # "" = the demo pair
    draft: str = ""  # "" = the main model's default draft; else a path, "mtp", "lookup" or "none"
    dirs: list[str] = field(default_factory=list)  # extra folders the model pickers search
    default_drafts: dict[str, str] = field(default_factory=dict)


def config_dir() -> Path:
    override = os.environ.get("TANDEM_CONFIG_DIR")
    return Path(override) if override else Path(platformdirs.user_config_dir("tandem"))


def default_config_path() -> Path:
    return config_dir() / "config.toml"


def load_config(path: Path) -> Config:
    """Read a config file. A missing file gives the defaults; a broken one raises ConfigError."""
    config = Config()
    if not path.exists():
        return config
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read the config file {path}: {exc}") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"the config file {path} is not valid TOML: {exc}") from exc
    models = _table(data, "models", path)
    config.main = str(models.get("main", ""))
    config.draft = str(models.get("draft", ""))
    dirs = models.get("dirs", [])
    if not isinstance(dirs, list):
        raise ConfigError(f"{path}: [models] dirs must be a list of folders")
    config.dirs = [str(d) for d in dirs]
    try:
        for name, value in _table(data, "settings", path).items():
            config.settings.set(name, value)
        config.settings.check()
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None
    config.default_drafts = {str(k): str(v) for k, v in _table(data, "default_drafts", path).items()}
    return config


def _table(data: dict[str, Any], name: str, path: Path) -> dict[str, Any]:
    table = data.get(name, {})
    if not isinstance(table, dict):
        raise ConfigError(f"{path}: [{name}] must be a table")
    return table


def dump_config(config: Config) -> str:
    settings = asdict(config.settings)
    lines = ["# Tandem configuration (written by tandem; safe to edit)", "", "[models]"]
    lines += [f"main = {_toml(config.main)}", f"draft = {_toml(config.draft)}", f"dirs = {_toml(config.dirs)}", "", "[settings]"]
    lines += [f"{name} = {_toml(value)}" for name, value in settings.items()]
    lines += ["", "[default_drafts]"]
    lines += [f"{_toml(main)} = {_toml(draft)}" for main, draft in sorted(config.default_drafts.items())]
    return "\n".join(lines) + "\n"


def save_config(config: Config, path: Path) -> Path | None:
    """Write atomically (temp + rename): a crash never leaves half a config. A symlink is written
    through (its target is replaced, the link kept); a device, FIFO or directory is refused. A file
    that is there but cannot be loaded is the user's work: it is copied aside first, and that copy's
    path is returned (None when nothing needed keeping)."""
    try:
        target = Path(os.path.realpath(path))
        mode = _regular_file_mode(target)
        if mode is None:
            target.parent.mkdir(parents=True, exist_ok=True)
        backup = _keep_unreadable(target) if mode is not None else None
        _write_atomically(target, dump_config(config), mode)
    except ConfigError as exc:
        raise ConfigError(f"cannot write the config file {path}: {exc}") from None
    except OSError as exc:
        raise ConfigError(f"cannot write the config file {path}: {exc.strerror or exc}") from exc
    return backup


def _regular_file_mode(target: Path) -> int | None:
    """The permission bits of the file to replace; None when there is none yet. Anything but a
    regular file is refused: replacing /dev/full or a FIFO with a file would break the system."""
    try:
        info = target.stat()
    except FileNotFoundError:
        return None
    if not stat.S_ISREG(info.st_mode):
        raise ConfigError(f"it is a {_file_kind(info.st_mode)}, not a regular file")
    return stat.S_IMODE(info.st_mode)


def _file_kind(mode: int) -> str:
    kinds = {stat.S_ISDIR: "directory", stat.S_ISCHR: "character device", stat.S_ISBLK: "block device",
             stat.S_ISFIFO: "FIFO", stat.S_ISSOCK: "socket"}  # fmt: skip
    return next((name for test, name in kinds.items() if test(mode)), "special file")


def _keep_unreadable(target: Path) -> Path | None:
    """Copy a file that does not load aside before it is replaced, so hand edits are never lost."""
    try:
        load_config(target)
    except ConfigError:
        pass
    else:
        return None
    stamp = time.strftime("%Y%m%d-%H%M%S")
    backup = target.with_name(f"{target.name}.corrupt-{stamp}")
    n = 1
    while backup.exists():
        n += 1
        backup = target.with_name(f"{target.name}.corrupt-{stamp}-{n}")
    try:
        shutil.copy2(target, backup)
    except BaseException:
        with contextlib.suppress(OSError):
            backup.unlink()  # half a copy (a full disk) is no backup
        raise
    return backup


def _write_atomically(target: Path, text: str, mode: int | None) -> None:
    temp = target.with_name(target.name + ".tmp")
    try:
        with open(temp, "w", encoding="utf-8") as file:
            file.write(text)
            file.flush()
            os.fsync(file.fileno())  # a full disk may only say so here; the old file must stay then
        if mode is not None:
            os.chmod(temp, mode)  # keep the user's permissions on the replaced file
        os.replace(temp, target)
    except BaseException:
        with contextlib.suppress(OSError):
            temp.unlink()
        raise


def _toml(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, list):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    return json.dumps(str(value), ensure_ascii=False)  # a JSON string is a valid TOML basic string
