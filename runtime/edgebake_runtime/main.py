"""`edgebake-runtime --config FILE`: validate, load the model, run until SIGTERM."""

from __future__ import annotations

import argparse
import logging
import signal
import sys
from pathlib import Path
from types import FrameType

from .atomic import write_atomic
from .config import ConfigError, describe_all, load_config
from .modelload import StartupError, load_checked_card
from .sdnotify import Notifier
from .service import Service

DEFAULT_CONFIG = Path("/etc/edgebake/app.yaml")
DEFAULT_OVERRIDES = Path("/etc/edgebake/seed-overrides.yaml")
EXIT_BAD_CONFIG = 2
EXIT_BAD_MODEL = 3
# Why the service is not running, for a technician after systemd stopped restarting it.
STARTUP_ERROR = Path("/data/edgebake/startup-error")


def record_startup_error(message: str | None, path: Path = STARTUP_ERROR) -> None:
    """Write (or with None, clear) the reason; best effort, /data may be missing or full."""
    try:
        if message is None:
            path.unlink(missing_ok=True)
        else:
            write_atomic(path, (message + "\n").encode())
    except OSError:
        pass


def check_only(config_path: Path, overrides: Path) -> int:
    """What the service would refuse at start, in one line, without starting anything."""
    try:
        config = load_config(config_path, overrides)
        card = load_checked_card(config.model_path, config.card_path)
    except ConfigError as exc:
        print(f"error: bad configuration: {exc}", file=sys.stderr)
        return EXIT_BAD_CONFIG
    except StartupError as exc:
        print(f"error: cannot start: {exc}", file=sys.stderr)
        return EXIT_BAD_MODEL
    print(f"{config_path}: ok (model {card.version}, {len(config.sources)} source(s))")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="edgebake-runtime",
                                     description="edgebake on-device inference service")
    parser.add_argument("--config", type=Path, default=DEFAULT_CONFIG)
    parser.add_argument("--overrides", type=Path, default=DEFAULT_OVERRIDES,
                        help="per-unit overrides written from the seed (used if present)")
    parser.add_argument("--log-level", default="INFO")
    parser.add_argument("--check", action="store_true",
                        help="check the configuration, the model and its card, then exit")
    parser.add_argument("--print-config-schema", action="store_true",
                        help="print every setting of app.yaml with its type, default and help")
    args = parser.parse_args(argv)
    if args.print_config_schema:
        print(describe_all())
        return 0
    if args.check:
        return check_only(args.config, args.overrides)
    logging.basicConfig(level=args.log_level.upper(), stream=sys.stderr,
                        format="%(levelname)s %(name)s: %(message)s")
    log = logging.getLogger("edgebake")
    notifier = Notifier()
    try:
        config = load_config(args.config, args.overrides)
    except ConfigError as exc:
        log.error("bad configuration: %s", exc)
        notifier.status(f"failed: bad configuration: {exc}")
        record_startup_error(f"bad configuration: {exc}")
        return EXIT_BAD_CONFIG
    try:
        app = Service(config, notifier)
    except StartupError as exc:
        log.error("cannot start: %s", exc)
        notifier.status(f"failed: {exc}")
        record_startup_error(f"cannot start: {exc}")
        return EXIT_BAD_MODEL
    record_startup_error(None)

    def on_signal(signum: int, frame: FrameType | None) -> None:
        app.request_stop()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    app.start()
    log.info("started: model %s, %d camera process(es)", app.card.version,
             len(app.cameras.processes))
    try:
        app.run()
    finally:
        app.stop()
    log.info("stopped cleanly")
    return 0


if __name__ == "__main__":
    sys.exit(main())
