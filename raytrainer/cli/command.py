"""The `raytrainer` console command.

    raytrainer train --config NAME|PATH [--dry-run] [--FIELD VALUE ...]   train (see train --help)
    raytrainer sweep --config NAME|PATH [--resume] [--FIELD VALUE ...]    hyperparameter search
    raytrainer configs                                                    list the shipped configs
    raytrainer configs cp NAME [DEST]                                     copy one (and its data) to edit
    raytrainer consolidate CHECKPOINT [--output DIR]                      full weights from fsdp/ZeRO-3 shards (local or s3://)
    raytrainer --version

Help, the config list and the version never import torch (under 2 s: raytrainer/__init__.py
_help_only); train and sweep run raytrainer.cli.job.
"""

from __future__ import annotations

import argparse
import sys

from .arguments import ConfigError

USAGE = __doc__.split("\n\n")[1]


def configs(argv: list[str]) -> int:
    from .shipped import copy_out, describe, shipped

    parser = argparse.ArgumentParser(prog="raytrainer configs", description="List the shipped job configs, or "
                                     "copy one (with the data files it names) to edit it.")
    parser.add_argument("action", nargs="?", choices=["ls", "cp"], default="ls")
    parser.add_argument("name", nargs="?", help="cp: the config's name")
    parser.add_argument("dest", nargs="?", default=".", help="cp: a folder or a file name (default: here)")
    ns = parser.parse_args(argv)
    if ns.action == "ls":
        found = shipped()
        width = max(map(len, found))
        for name, path in found.items():
            print(f"{name:<{width}}  {describe(path)}")
        return 0
    if not ns.name:
        parser.error("cp needs the config's name (raytrainer configs lists them)")
    try:
        print(copy_out(ns.name, ns.dest))
    except ConfigError as e:
        print(f"raytrainer configs: error: {e}", file=sys.stderr)
        return 2
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__.split("\n\n")[0] + "\n\n" + USAGE)
        return 0 if argv else 2
    if argv[0] == "--version":
        from raytrainer import __version__

        print(f"raytrainer {__version__}")
        return 0
    command, rest = argv[0], argv[1:]
    if command == "configs":
        return configs(rest)
    if command == "consolidate":
        from raytrainer.checkpoint.consolidate_storage import main as consolidate

        return consolidate(rest)
    if command not in ("train", "sweep"):
        print(f"raytrainer: error: unknown command {command!r} (train, sweep, configs, consolidate)\n{USAGE}",
              file=sys.stderr)
        return 2
    if "--help-all" in rest:
        from .config import full_help

        try:
            print(full_help([a for a in rest if a != "--help-all"]))
        except ConfigError as e:  # --config or --trainer names nothing
            print(f"raytrainer {command}: error: {e}", file=sys.stderr)
            return 2
        return 0
    if "-h" in rest or "--help" in rest:
        from .help import grouped_help

        print(grouped_help(command), end="")
        return 0
    from raytrainer.log_filter import skip_ray_noise

    skip_ray_noise()  # before ray is imported
    from .job import cli

    return cli(rest, prog=f"raytrainer {command}", command=command)


if __name__ == "__main__":
    sys.exit(main())
