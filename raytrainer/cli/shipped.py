"""The job configs shipped in the package (raytrainer/configs/*.yaml): find one by name, list, copy out
(`raytrainer configs`, in the spirit of `tune ls` / `tune cp`)."""

from __future__ import annotations

import os
import shutil

from .arguments import ConfigError, closest

CONFIGS_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")


def shipped() -> dict[str, str]:
    """name -> path of every shipped config."""
    return {f[:-5]: os.path.join(CONFIGS_DIR, f) for f in sorted(os.listdir(CONFIGS_DIR)) if f.endswith(".yaml")}


def config_path(name_or_path: str) -> str:
    """A shipped config's name (tiny_gpt2) or a path to a YAML file."""
    configs = shipped()
    if name_or_path in configs:
        return configs[name_or_path]
    if os.path.isfile(os.path.expanduser(name_or_path)):
        return os.path.expanduser(name_or_path)
    if os.sep in name_or_path or name_or_path.endswith((".yaml", ".yml")):
        raise ConfigError(f"--config {name_or_path}: no such file")
    raise ConfigError(f"--config {name_or_path}: neither a file nor a shipped config ({', '.join(configs)})"
                      f"{closest(name_or_path, configs)}")


def describe(path: str, limit: int = 110) -> str:
    """A config's description: the first sentence of the comment after its Run/Submit lines."""
    lines = []
    with open(path) as f:
        for line in f:
            if not line.startswith("#"):
                break
            if not line.startswith(("# Run:", "# Submit:")):
                lines.append(line.lstrip("#").strip())
    text = " ".join(lines)
    end = text.find(". ")
    text = text[:end + 1] if end > 0 else text
    return text if len(text) <= limit else text[: limit - 3] + "..."


def copy_out(name: str, dest: str) -> str:
    """Copy a shipped config (and the data files it names) to dest; returns the new config's path.
    Its relative data paths (data/...) keep working beside the copy."""
    source = config_path(name)
    target = os.path.join(dest, os.path.basename(source)) if os.path.isdir(dest) or dest.endswith(os.sep) else dest
    if os.path.exists(target):
        raise ConfigError(f"{target} exists: give another destination")
    os.makedirs(os.path.dirname(os.path.abspath(target)), exist_ok=True)
    shutil.copyfile(source, target)
    with open(source) as f:
        text = f.read()
    data_dir, beside = os.path.join(CONFIGS_DIR, "data"), os.path.join(os.path.dirname(os.path.abspath(target)), "data")
    for name in sorted(os.listdir(data_dir)):
        if f"data/{name}" in text and not os.path.exists(os.path.join(beside, name)):  # a user's edits stay
            os.makedirs(beside, exist_ok=True)
            shutil.copyfile(os.path.join(data_dir, name), os.path.join(beside, name))
    return target
