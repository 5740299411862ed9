"""Invoke tasks: thin wrappers; the work lives in image/ (edgebake_builder) and runtime/."""

from __future__ import annotations

import functools
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar, cast

from edgebake_builder.errors import BuildError
from edgebake_runtime.bundle import BundleError
from invoke.context import Context
from invoke.exceptions import Exit
from invoke.tasks import task

ROOT = Path(__file__).resolve().parent
WARM_LOG = ROOT / "out" / "warm-base.log"
Body = TypeVar("Body", bound=Callable[..., None])


def _stop_like_ctrl_c(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def fails_cleanly(body: Body) -> Body:
    """A task whose user-fixable errors end it with one line and exit code 1, and whose
    Ctrl-C or SIGTERM (a container being stopped, a CI job cancelled) ends it with 130 once
    each step has cleaned up after itself (its temp folders, its QEMU)."""
    @functools.wraps(body)
    def run(*args: Any, **kwargs: Any) -> None:
        signal.signal(signal.SIGTERM, _stop_like_ctrl_c)
        try:
            body(*args, **kwargs)
        except (BuildError, BundleError) as exc:
            raise Exit(f"error: {exc}", code=1) from None
        except KeyboardInterrupt:
            raise Exit("interrupted; nothing half-written was left in place", code=130) \
                from None
    return cast(Body, run)


@task(help={"target": "recipe target under recipes/targets (pi4)",
            "recipe": "your own recipe YAML, layered on top of the target",
            "model": ".tflite model to bake in (default: the project's BlazeFace model)",
            "out": "output folder (default out/<target>)",
            "no_cache": "rebuild the base rootfs even if a cached one matches",
            "xz": "publish .img.xz (for balenaEtcher and older Imager) instead of .img.zst",
            "xz_level": "with --xz: xz preset (0-9; 1 is fast, 6 is smaller and slower)",
            "base": "a Raspberry Pi OS Lite image (.img or .img.xz) to build on",
            "base_sha256": "the sha256 published with --base (checked before any work)",
            "version": "the system version (default: the recipe's `version`)"})
@fails_cleanly
def build_image(c: Context, target: str = "pi4", recipe: str = "", model: str = "",
                out: str = "", no_cache: bool = False, xz: bool = False, xz_level: int = 1,
                base: str = "", base_sha256: str = "", version: str = "") -> None:
    """Build a flashable image: recipe + model -> .img, .img.zst, .bmap, SHA256SUMS, manifest
    (and, with an A/B layout and an OS key in keys/, the signed system bundle)."""
    from edgebake_builder.build import BuildOptions
    from edgebake_builder.build import build_image as run_build

    options = BuildOptions(target=target, recipe_file=Path(recipe) if recipe else None,
                           model=model, out_dir=Path(out) if out else None,
                           no_cache=no_cache, compression="xz" if xz else "zst",
                           xz_level=xz_level,
                           base_image=Path(base) if base else None, base_sha256=base_sha256,
                           version=version)
    run_build(options)


@task(help={"target": "recipe target whose image to test",
            "image": "image to test (default: the one in out/<target>)",
            "fail_fast": "stop after the static checks if any of them fails",
            "update_trials": "also apply the bundles a unit must refuse or roll back "
                             "(tampered, failing golden test, undecodable; ~3 min)",
            "os_rollback": "with the update trials, on an A/B image: also install a system "
                           "that never gets healthy and see it rolled back (~5 min)",
            "supervision_trials": "also kill -9 and SIGSTOP the service and unplug the camera "
                                  "(the same units and runtime on every base; ~3 min)",
            "runtime_checks": "also the runtime's own logic over SSH: a model update, a "
                              "rollout, samples, the page in a browser (the same runtime on "
                              "every base; ~6 min)"})
@fails_cleanly
def test_image(c: Context, target: str = "pi4", image: str = "", fail_fast: bool = False,
               update_trials: bool = True, supervision_trials: bool = True,
               os_rollback: bool = True, runtime_checks: bool = True) -> None:
    """Validate the exact image: static testinfra checks, then QEMU boot + checks over SSH."""
    from edgebake_builder.progress import Progress
    from edgebake_builder.validate.run import find_image
    from edgebake_builder.validate.run import test_image as run_tests

    image_path, out_dir, manifest = find_image(ROOT / "out" / target, target,
                                               Path(image) if image else None)
    progress = Progress(3, log_path=out_dir / "test-image.log")
    result = run_tests(image_path, out_dir, manifest, progress, fail_fast, update_trials,
                       supervision_trials, os_rollback, runtime_checks)
    for name, value in result.figures.items():
        print(f"{name}: {value:.1f}" if name.startswith("exposure") else
              f"{name}: {value:.1f} s")
    print(f"test-image: {result.passed} passed, {result.failed} failed ({result.junit})")
    if result.failed or result.passed == 0:
        raise Exit(code=1)


@task(help={"cycles": "how many times to pull the plug",
            "target": "recipe target whose image to use",
            "image": "image to use (default: the one in out/<target>)",
            "seed": "random seed for the moments of the cuts (default: a new one)",
            "watchdog": "also freeze PID 1 and time the hardware watchdog's reset"})
@fails_cleanly
def bench_powercut(c: Context, cycles: int = 10, target: str = "pi4", image: str = "",
                   seed: int = -1, watchdog: bool = True) -> None:
    """Kill the QEMU unit with SIGKILL at random moments and check what survives each cut."""
    from edgebake_builder.progress import Progress
    from edgebake_builder.validate.powercut import run_bench, summary
    from edgebake_builder.validate.run import find_image

    if cycles < 1:
        raise Exit("error: --cycles: expected 1 or more", code=2)
    started = time.monotonic()
    image_path, out_dir, manifest = find_image(ROOT / "out" / target, target,
                                               Path(image) if image else None)
    progress = Progress(1, log_path=out_dir / "bench-powercut.log")
    with progress.step(f"{cycles} power cuts on {image_path.name} under QEMU"):
        cuts, reset_sec = run_bench(image_path, out_dir, manifest, cycles, progress,
                                    None if seed < 0 else seed, watchdog)
    if reset_sec is not None:
        print(f"hardware watchdog: PID 1 frozen, unit reset and back to inference in "
              f"{reset_sec:.1f} s")
    print(f"bench time: {time.monotonic() - started:.0f} s")
    print(summary(cuts))
    if not all(cut.survived for cut in cuts):
        raise Exit(code=1)


@task(help={"cycles": "how many good system updates to install (each ~5 min under QEMU)",
            "target": "recipe target whose image boots", "image": "image to boot",
            "second": "a second build's .raucb to install first (default: out-v2/*.raucb)"})
@fails_cleanly
def bench_osupdate(c: Context, cycles: int = 1, target: str = "pi4", image: str = "",
                   second: str = "") -> None:
    """System updates under QEMU: good ones timed, failed ones rolled back, bad ones refused."""
    from edgebake_builder.bench.osupdate import run_bench
    from edgebake_builder.progress import Progress
    from edgebake_builder.steps.osbundle import CERT_NAME, KEY_NAME, OsKeys
    from edgebake_builder.validate.run import find_image

    if cycles < 1:
        raise Exit("error: --cycles: expected 1 or more", code=2)
    started = time.monotonic()
    image_path, out_dir, manifest = find_image(ROOT / "out" / target, target,
                                               Path(image) if image else None)
    if not (manifest.get("system") or {}).get("bundle"):
        raise Exit(f"error: {out_dir / 'manifest.json'}: system.bundle: expected an A/B image "
                   "built with an OS key (invoke make-os-key --out keys/, then build-image)",
                   code=1)
    keyring = Path(manifest["recipe"]["update"]["os_keyring"]).resolve()
    keys = OsKeys(keyring, keyring.parent / KEY_NAME, keyring.parent / CERT_NAME)
    found = sorted((ROOT / "out-v2").glob("*.raucb")) if not second else [Path(second)]
    progress = Progress(1, log_path=out_dir / "bench-osupdate.log")
    with progress.step(f"system updates on {image_path.name} under QEMU"):
        outcome = run_bench(image_path, out_dir, manifest, keys, cycles, progress,
                            found[-1] if found else None)
    print(f"bench time: {time.monotonic() - started:.0f} s")
    for problem in outcome.problems:
        print(f"problem: {problem}")
    print(outcome.line())
    if outcome.problems:
        raise Exit(code=1)


@task(help={"from_": "the SBOM of what runs now (<name>.spdx.json beside an image)",
            "to": "the SBOM of the update"})
@fails_cleanly
def sbom_diff(c: Context, from_: str = "", to: str = "") -> None:
    """What a system update changes: packages added, removed and changed, from two SBOMs."""
    from edgebake_builder.sbom import diff

    if not from_ or not to:
        raise Exit("error: give both --from A.spdx.json and --to B.spdx.json", code=2)

    lines, summary = diff(Path(from_), Path(to))
    for line in lines:
        print(line)
    print(summary)


@task(help={"examples": "cases per loader"})
def bench_fuzz(c: Context, examples: int = 10000) -> None:
    """Hypothesis on the recipe loader, the seed checker and the app-config validator."""
    started = time.monotonic()
    result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                             "--hypothesis-show-statistics", str(ROOT / "tests" / "test_fuzz.py")],
                            cwd=ROOT, env={**os.environ, "EDGEBAKE_FUZZ_EXAMPLES": str(examples)},
                            check=False)
    print(f"fuzzing: {examples} cases per test, 4 tests, {time.monotonic() - started:.0f} s, "
          f"{'no' if result.returncode == 0 else 'some'} undeclared exceptions")
    if result.returncode != 0:
        raise Exit(code=1)


@task(help={"seconds": "measuring time per set of mount options",
            "rate": "records per second (2 cameras at 30 fps: 60)"})
def bench_fsopts(c: Context, seconds: float = 60.0, rate: float = 60.0) -> None:
    """The data partition's mount options: device writes and sync latency, side by side."""
    from edgebake_builder.bench.fsopts import report, run_bench

    for line in report(run_bench(seconds, rate)):
        print(line)


BROKER_HELP = {"broker": "MQTT broker host of the fleet",
               "port": "broker port (default $EDGEBAKE_MQTT_PORT, else 8883 with TLS, 1883 "
                       "without)",
               "username": "broker user (default $EDGEBAKE_MQTT_USERNAME)",
               "password": "broker password (default $EDGEBAKE_MQTT_PASSWORD, which keeps it "
                           "out of the process list)",
               "ca_file": "CA certificate for TLS, TLS when given (default "
                          "$EDGEBAKE_MQTT_CA_FILE)"}


@task(help={**BROKER_HELP, "wait": "seconds to listen (retained topics arrive at once)",
            "html": "write the fleet as one self-contained page to this file",
            "serve": "serve the fleet page live on this port (0: any free one) until Ctrl-C",
            "bind": "address the live page listens on (default 127.0.0.1: this machine only)",
            "rollout": "a rollout's state file: each unit's stage goes on the page"})
@fails_cleanly
def fleet_status(c: Context, broker: str, port: int = 0, wait: float = 2.0,
                 username: str = "", password: str = "", ca_file: str = "", html: str = "",
                 serve: int = -1, bind: str = "127.0.0.1", rollout: str = "") -> None:
    """The units seen on MQTT as a table, or as a page (--html, or live with --serve)."""
    from edgebake_builder.fleet import broker_of, collect, table

    where = broker_of(broker, port, username, password, ca_file)
    state = _rollout_state(rollout)
    if serve >= 0:
        _serve_fleet_page(where, serve, bind, state)
        return
    units = collect(where, wait)
    if html:
        from edgebake_builder.fleetpage import render
        from edgebake_runtime.atomic import write_atomic

        write_atomic(Path(html), render(units, state).encode())
        print(f"fleet page: {html} ({len(units)} unit(s))")
        return
    if not units:
        print(f"no units seen on {broker}:{where.port} (topics edgebake/+/status and /health)")
        return
    print(table(units))


def _rollout_state(path: str) -> Any:
    if not path:
        return None
    from edgebake_builder.rollout.state import load_state

    return load_state(Path(path))


def _serve_fleet_page(where: Any, port: int, bind: str, state: Any) -> None:
    """The live fleet page, from a subscription kept open, until Ctrl-C."""
    import threading

    from edgebake_builder.fleet import FLEET_TOPICS, FleetWatch, connect
    from edgebake_builder.fleetpage import render, serve

    watch = FleetWatch()
    client = connect(where, watch.on_message, FLEET_TOPICS)
    stop = threading.Event()
    try:
        serve(port, bind, lambda: render(watch.units(), state, refresh_sec=5),
              lambda p: print(f"fleet page: http://{bind}:{p}/ (Ctrl-C ends it)", flush=True),
              stop)
    except KeyboardInterrupt:
        stop.set()
    except OSError as exc:
        raise BuildError(f"cannot serve the fleet page on {bind}:{port}: {exc}") from None
    finally:
        client.loop_stop()
        client.disconnect()


@task(help={**BROKER_HELP, "bundle": "the signed .ebundle to roll out",
            "key": "private key that signed it (the orders are signed with it too; default: "
                   "the *.key here that did)",
            "group": "every unit that reports this update.mqtt_group",
            "units": "or these device ids, comma-separated",
            "stages": "units by the end of each stage: counts or percentages",
            "max_failures": "stop once more units than this have failed",
            "health_window": "seconds each unit runs the model on trial before it confirms",
            "deadline": "seconds a unit may stay silent (offline) before it counts as failed",
            "target": "the units' target; the bundle must be made for it",
            "url": "where units download the bundle (default: inside the order, up to 4 MiB)",
            "state": "the rollout's state file (default <bundle>.rollout.json)",
            "resume": "go on with the rollout in the state file",
            "status": "print the state file's table and exit",
            "abort": "roll the units that took it back to their previous model"})
@fails_cleanly
def rollout(c: Context, bundle: str, broker: str = "", key: str = "",
            group: str = "", units: str = "", stages: str = "1,10%,50%,100%",
            max_failures: int = 0, health_window: float = 600.0, deadline: float = 3600.0,
            target: str = "pi4", url: str = "", state: str = "", resume: bool = False,
            status: bool = False, abort: bool = False, port: int = 0, username: str = "",
            password: str = "", ca_file: str = "") -> None:
    """Roll a bundle out in stages over MQTT, stopping at the failure threshold."""
    from edgebake_builder.fleet import broker_of
    from edgebake_builder.rollout.run import Rollout, RolloutRequest
    from edgebake_builder.rollout.state import default_state_path, load_state, table

    state_path = Path(state) if state else default_state_path(Path(bundle))
    if status:
        print(table(load_state(state_path)))
        return
    if not broker:
        raise Exit("error: --broker: expected the fleet's MQTT broker host", code=1)
    from edgebake_builder.rollout.plan import find_key

    signer = Path(key) if key else find_key(Path(bundle), Path.cwd())
    request = RolloutRequest(Path(bundle), broker_of(broker, port, username, password, ca_file),
                             signer, stages, group, units, max_failures, health_window,
                             deadline, target, url, state_path, resume or abort)
    engine = Rollout(request)
    done = engine.abort() if abort else engine.run()
    print(table(done))
    if done.phase == "stopped":
        raise Exit(f"error: rollout {done.note}", code=1)


@task(help={**BROKER_HELP, "to": "a unit's device id, or group/<name>",
            "key": "private key from make-key (one the units trust)",
            "url": "the bundle's URL (its origin in the units' update.allowed_origins)",
            "bundle": "or the .ebundle itself, sent in the order (up to 4 MiB)",
            "samples": "or keep the next N frames of every camera as samples (1-100)",
            "fleet": "the units' fleet (recipe update.fleet)",
            "system": "the url is a system bundle (.raucb): install it on A/B units",
            "window": "seconds the new model or system must stay healthy (the unit's default "
                      "if not given)"})
@fails_cleanly
def send_order(c: Context, broker: str, to: str, key: str, url: str = "", bundle: str = "",
               samples: int = 0, fleet: str = "default", port: int = 0, username: str = "",
               password: str = "", ca_file: str = "", system: bool = False,
               window: float = -1) -> None:
    """Order units over MQTT: install a bundle, or keep samples (signed, never replayable)."""
    from edgebake_builder.fleet import broker_of
    from edgebake_builder.fleet import send_order as publish
    from edgebake_builder.signing import read_private_key, sign_order

    try:
        data = Path(bundle).read_bytes() if bundle else b""
    except OSError as exc:
        raise Exit(f"error: {bundle}: {exc.strerror}", code=1) from None
    order = sign_order(read_private_key(Path(key)), to, fleet, url, data, samples=samples,
                       system=system, window_sec=None if window < 0 else window)
    topic = publish(broker_of(broker, port, username, password, ca_file), to, order, system)
    print(f"order sent on {topic}; each unit reports on edgebake/<device>/update/status")


@task(help={"host": "the unit's address", "bundle": "the signed .ebundle to install",
            "port": "SSH port", "user": "SSH user (root: the update writes /data/models)",
            "identity": "SSH private key file", "allow_rollback": "allow an older version"})
@fails_cleanly
def push_model(c: Context, host: str, bundle: str, port: int = 22, user: str = "root",
               identity: str = "", allow_rollback: bool = False) -> None:
    """Copy a signed bundle to a unit over SSH and apply it there (checked on the unit)."""
    from edgebake_builder.flashing.push import push_bundle

    print(push_bundle(host, Path(bundle), port, user, identity, allow_rollback))


@task(help={"host": "the unit's address", "bundle": "the system bundle (.raucb) from build-image",
            "port": "SSH port", "user": "SSH user (root: RAUC writes the other slot)",
            "identity": "SSH private key file",
            "window": "seconds the new system must stay healthy before it is kept",
            "wait": "wait for the unit's verdict (confirmed or rolled back) and print it"})
@fails_cleanly
def push_os(c: Context, host: str, bundle: str, port: int = 22, user: str = "root",
            identity: str = "", window: int = 300, wait: bool = False) -> None:
    """Install a signed system bundle on a unit over SSH (RAUC), reboot it into the new slot."""
    from edgebake_builder.flashing.pushos import push_os as run_push
    from edgebake_builder.flashing.pushos import wait_for_verdict
    from edgebake_builder.steps.osbundle import bundle_version

    print(run_push(host, Path(bundle), port, user, identity, window), flush=True)
    if wait:
        status = wait_for_verdict(host, bundle_version(Path(bundle)), window + 900, port,
                                  user, identity)
        update = status.get("update") or {}
        print(f"{host}: system {update.get('version')} {update.get('state')} "
              f"(slot {status.get('booted')}): {update.get('reason', '')}".rstrip(": "))
        if update.get("state") != "confirmed":
            raise Exit(code=1)


@task(help={"model": "Keras .keras/.h5, SavedModel directory, PyTorch .pt2 (torch.export) or .onnx",
            "quantize": "none, dynamic, float16 or int8",
            "output": "the .tflite to write (its card goes next to it)",
            "representative_data": "image folder or .npz (x; NHWC or the model's NCHW) to "
                                   "calibrate int8",
            "validation_data": "image folder or .npz (x, y) for the accuracy gate",
            "labels": "text file with one class name per line",
            "max_accuracy_loss": "fail when accuracy drops by more than this fraction",
            "converter": "tensorflow, litert-torch or onnx2tf (default: by the file's suffix)",
            "mean": "per-channel mean for [0, 1] inputs, like 0.485,0.456,0.406",
            "std": "per-channel std for [0, 1] inputs, like 0.229,0.224,0.225",
            "input_shape": "fixed input shape for a model with dynamic ones, like 1,3,320,320"})
@fails_cleanly
def convert_model(c: Context, model: str, output: str, quantize: str = "none",
                  representative_data: str = "", validation_data: str = "", labels: str = "",
                  max_accuracy_loss: float = 0.01, converter: str = "", mean: str = "",
                  std: str = "", input_shape: str = "") -> None:
    """Convert a trained model to TFLite with a model card and a measured accuracy gate."""
    from edgebake_builder.convert.converter import ConvertOptions
    from edgebake_builder.convert.converter import convert_model as run_convert
    from edgebake_builder.convert.numbers import number_list

    options = ConvertOptions(
        model=Path(model), output=Path(output), quantize=quantize,
        representative_data=Path(representative_data) if representative_data else None,
        validation_data=Path(validation_data) if validation_data else None,
        labels=Path(labels) if labels else None, max_accuracy_loss=max_accuracy_loss,
        converter=converter or None, mean=number_list("--mean", mean, float),
        std=number_list("--std", std, float),
        input_shape=number_list("--input-shape", input_shape, int))
    result = run_convert(options)
    source = result.card.get("source", {})
    print(f"wrote {result.output} ({result.size_bytes} bytes) and {result.card_path}; "
          f"{source.get('format')} via {source.get('converter')}, {quantize}")
    if result.accuracy is not None:
        acc = result.accuracy
        if acc.data == "synthetic":
            print(f"gate (no --validation-data; {acc.samples} synthetic frames, not enforced): "
                  f"top-1 agreement {acc.top1_agreement:.4f}, max |deviation| "
                  f"{acc.max_abs_deviation:.4g}")
        else:
            print(f"gate: {acc.metric}: original {acc.reference:.4f}, converted "
                  f"{acc.converted:.4f}, delta {acc.delta:+.4f}; top-1 agreement "
                  f"{acc.top1_agreement:.4f}, max |deviation| {acc.max_abs_deviation:.4g} "
                  f"on {acc.samples} samples")


@task(help={"out": "folder for resnet18.pt2/.onnx, rep.npz, val.npz, yolo11n.onnx, coco.txt",
            "yolo_size": "YOLO11n input size in pixels"})
@fails_cleanly
def example_models(c: Context, out: str = "examples", yolo_size: int = 320) -> None:
    """Make the PyTorch and ONNX example models here (ResNet18 on digits, untrained YOLO11n)."""
    from edgebake_builder.examples.models import FILES, make_examples

    make_examples(Path(out), yolo_size)
    print(f"wrote {', '.join(FILES)} into {out}/")


@task(help={"name": "torch or onnx2tf"})
@fails_cleanly
def toolchain(c: Context, name: str = "torch") -> None:
    """Print a converter toolchain's Python (made first if it is not there yet)."""
    from edgebake_builder.convert.toolchain import TOOLCHAINS, python_for

    if name not in TOOLCHAINS:
        raise BuildError(f"--name: expected one of {', '.join(TOOLCHAINS)}, found {name!r}")
    print(python_for(name, say=lambda line: print(line, file=sys.stderr)))


@task(help={"units": "how many unit processes (each about 60 MiB)",
            "max_failures": "the bad bundle's failure threshold"})
@fails_cleanly
def bench_rollout(c: Context, units: int = 10, max_failures: int = 1) -> None:
    """A fleet of real unit processes on one broker: a good staged rollout, then a bad one."""
    from edgebake_builder.bench.rollout import bench_rollout as run_bench
    from edgebake_builder.progress import Progress

    if not 1 <= units <= 500:
        raise Exit("error: --units: expected 1 to 500", code=1)
    result = run_bench(units, max_failures, Progress(5))
    print(f"memory per unit: {result.memory_mib_per_unit:.0f} MiB (service and camera "
          "process, proportional set size)")
    print(result.line())
    if result.confirmed != units or result.left_on_bad:
        raise Exit("error: the rollouts did not end as they must (all confirmed, none left "
                   "on the bad bundle)", code=1)


@task(help={"seconds": "measuring time per case", "threads": "interpreter num_threads",
            "rounds": "every case this many times, interleaved; medians are reported"})
def bench_runtime(c: Context, seconds: float = 5.0, threads: int = 1, rounds: int = 3) -> None:
    """Pipeline vs bare invoke loop on the default model with the replay source."""
    import shutil
    import tempfile

    from edgebake_builder.bench.runtime import bench_runtime as run_bench
    from edgebake_builder.bench.runtime import report
    from edgebake_builder.progress import Progress
    from edgebake_builder.steps.model import DEFAULT_MODEL, fetch_locked_model, read_models_lock

    progress = Progress(1)
    model = fetch_locked_model(read_models_lock()[DEFAULT_MODEL], progress)
    with tempfile.TemporaryDirectory() as tmp:
        replay = Path(tmp) / "replay"
        replay.mkdir()
        import skimage.data

        shutil.copy(Path(skimage.data.__file__).parent / "astronaut.png", replay / "a.png")
        heavier = fetch_locked_model(read_models_lock()["face_detection_full_range"], progress)
        report(run_bench(model, replay, seconds, threads, heavier, rounds, progress), threads,
               progress)


@task(help={"only": "keras (a digits CNN) or torch (ResNet18 .pt2/.onnx, YOLO11n .onnx); "
                    "default both"})
@fails_cleanly
def bench_convert(c: Context, only: str = "") -> None:
    """Size, accuracy delta, host latency and conversion time of each quantisation."""
    from edgebake_builder.bench.convert import bench_convert as run_bench
    from edgebake_builder.bench.convert_torch import bench_foreign
    from edgebake_builder.progress import Progress

    if only not in ("", "keras", "torch"):
        raise BuildError(f"--only: expected keras or torch, found {only!r}")
    if only != "torch":
        run_bench(Progress(1))
    if only != "keras":
        bench_foreign(Progress(1))


@task(help={"target": "recipe target", "cold": "rebuild the base rootfs (no cache) first",
            "vendor": "also customise a 2.8 GB Raspberry Pi OS look-alike (--base) and compare"})
@fails_cleanly
def bench_build(c: Context, target: str = "pi4", cold: bool = True, vendor: bool = False
                ) -> None:
    """Cold build time, warm rebuild time after an app change, and output sizes."""
    from edgebake_builder.bench.build import bench_build as run_bench
    from edgebake_builder.progress import Progress

    run_bench(target, cold, Progress(1), vendor)


@task(help={"image": "the .img to write (its .bmap must sit next to it)",
            "device": "the SD card (/dev/sdX) or an image file to write",
            "seed": "this unit's edgebake-seed.yaml (hostname, keys, app overrides)",
            "units": "a CSV with one unit per row: flashes one card per row, asking for each",
            "log": "flash log (JSON lines) for --units (default: next to the image)",
            "yes": "do not ask before writing a block device",
            "force": "allow a disk that is not removable (never the system disk)"})
@fails_cleanly
def flash(c: Context, image: str, device: str, seed: str = "", units: str = "", log: str = "",
          yes: bool = False, force: bool = False) -> None:
    """Write the image with bmaptool, put the unit's seed on its boot partition, read back."""
    from edgebake_builder.flashing.units import flash_units
    from edgebake_builder.flashing.write import flash as run_flash

    def confirm(question: str) -> bool:
        return yes or input(f"{question} [y/N] ").strip().lower() in ("y", "yes")

    def next_card(unit: str) -> None:
        if not yes:
            input(f"insert the card for {unit} and press Enter ")

    try:
        if units:
            log_path = Path(log) if log else Path(image).with_name("flash-log.jsonl")
            for line in flash_units(Path(image), Path(device), Path(units), log_path,
                                    force=force, confirm=confirm, next_card=next_card):
                print(line)
            print(f"flash log: {log_path}")
        else:
            print(run_flash(Path(image), Path(device), Path(seed) if seed else None,
                            force=force, confirm=confirm))
    except (EOFError, KeyboardInterrupt):
        raise Exit("stopped; the card being written may be incomplete", code=130) from None


@task
def recipe_schema(c: Context) -> None:
    """Print every recipe setting with its type, default and help."""
    from edgebake_builder.recipe.schema import describe_all

    print(describe_all())


@task(help={"target": "recipe target", "recipe": "optional user recipe on top"})
@fails_cleanly
def show_recipe(c: Context, target: str = "pi4", recipe: str = "") -> None:
    """Print the resolved recipe and its content hash (validates it; does no work)."""
    import yaml
    from edgebake_builder.recipe import load_recipe

    resolved = load_recipe(target, Path(recipe) if recipe else None)
    print(yaml.safe_dump(resolved.as_nested(), sort_keys=False), end="")
    print(f"# recipe_sha256: {resolved.sha256()}")


@task(help={"unit": "run only the fast unit tests", "keep_going": "don't stop at first failure",
            "long": "also the checks beyond CI's budget (marked `long`)"})
def test(c: Context, unit: bool = False, keep_going: bool = True, long: bool = False) -> None:
    """Run the test suite: unit tests, TensorFlow conversion, the image builds, QEMU boots."""
    import shlex

    skip = ["image", "boot"] if unit else []
    if not long:
        skip.append("long")
    # TensorFlow's own TFLite build clashes with tflite-runtime in one process: two runs.
    runs = [["tensorflow", *skip], ["not tensorflow", *skip]]
    # On a cold cache a base is minutes of mmdebstrap, mostly one emulated dpkg at a time:
    # it is made beside the first run, and the second run waits for it (a build of a base
    # that is being made waits for it too). --long makes the trixie base first.
    import tempfile
    import time

    from edgebake_builder.validate.timing import Check, read_junit, table

    # the pi4-trixie checks are all in --long: without it only the bookworm base is needed
    warming = None if unit else _warm_base_cache(["pi4-trixie", "pi4"] if long else ["pi4"])
    failed = 0
    phases: list[tuple[str, float, list[Check]]] = []
    reports = Path(tempfile.mkdtemp(prefix="edgebake-test-"))
    for number, (wanted, *excluded) in enumerate(runs):
        expression = " and ".join([f"({wanted})", *(f"not {m}" for m in excluded)])
        report = reports / f"run-{number}.xml"
        args = [sys.executable, "-m", "pytest", "-ra", "--durations=12", "-m", expression,
                f"--junitxml={report}"]
        if not keep_going:
            args.append("-x")
        if number == 1 and warming is not None:
            print(f"waiting for the base rootfs being built beside the tests "
                  f"(log: {WARM_LOG})", flush=True)
            began = time.monotonic()
            warming.wait()  # a failed warm-up is retried, and reported, by the build itself
            phases.append(("waiting for the base rootfs built beside", time.monotonic() - began,
                           []))
        began = time.monotonic()
        result = c.run(shlex.join(args), warn=True, pty=False)
        phases.append((f"pytest -m {wanted!r}", time.monotonic() - began, read_junit(report)))
        code = result.exited if result is not None else 1
        if code == 5:
            raise Exit(f"error: pytest collected no tests for -m {expression!r}", code=1)
        failed = failed or code
        if code and not keep_going:
            break
    print(table(phases), flush=True)
    if failed:
        raise Exit(code=failed)


def _warm_base_cache(targets: list[str]) -> subprocess.Popen[bytes] | None:
    """Build the targets' base rootfs into the cache in the background, in this order,
    where they are not there yet."""
    from edgebake_builder.recipe import load_recipe
    from edgebake_builder.steps.bootstrap import base_tarball

    missing = [t for t in targets if not base_tarball(load_recipe(t)).is_file()]
    if not missing:
        return None
    log = WARM_LOG
    log.parent.mkdir(parents=True, exist_ok=True)
    code = ("from edgebake_builder.progress import Progress; "
            "from edgebake_builder.recipe import load_recipe; "
            "from edgebake_builder.steps.bootstrap import bootstrap_base; "
            f"[bootstrap_base(load_recipe(t), Progress(1)) for t in {missing!r}]")
    with log.open("wb") as out:
        return subprocess.Popen([sys.executable, "-c", code, str(log)], stdout=out,
                                stderr=subprocess.STDOUT, cwd=ROOT)


@task(help={"minutes": "how long to run", "rate": "records per second fed to the journal"})
@fails_cleanly
def soak(c: Context, minutes: float = 10.0, rate: float = 22000.0) -> None:
    """Journal + MQTT on a tiny filesystem with the broker stopped and started, for minutes."""
    from edgebake_builder.bench.soak import run_soak
    from edgebake_builder.progress import Progress

    result = run_soak(minutes, Progress(1), rate=rate)
    print(f"      {result.simulated_days:.1f} simulated days at 5 fps in "
          f"{result.seconds:.0f}s, broker restarted {result.broker_restarts} times")
    print(result.line())
    if result.lost:
        raise Exit(code=1)


@task(help={"out": "where to write the look-alike .img",
            "firstrun": "add Imager's firstrun.sh and its kernel arguments (bookworm)",
            "cloud_init": "add Imager's cloud-init user-data and network-config (trixie)"})
@fails_cleanly
def make_raspios_lookalike(c: Context, out: str = "out/raspios-lookalike.img.xz",
                           firstrun: bool = False, cloud_init: bool = False) -> None:
    """Make a Raspberry Pi OS Lite look-alike image, to try `build-image --base` offline.

    Its layout, names and hooks over the pi4 base: the real image cannot be downloaded here."""
    from edgebake_builder.build import load_recipe
    from edgebake_builder.progress import Progress
    from edgebake_builder.steps.bootstrap import bootstrap_base
    from edgebake_builder.validate.lookalike import make_raspios_lookalike as make

    progress = Progress(1)
    tarball = bootstrap_base(load_recipe("pi4"), progress)
    path = Path(out).resolve()
    path.parent.mkdir(parents=True, exist_ok=True)
    make(tarball, path, progress, firstrun=firstrun, cloud_init=cloud_init)
    from edgebake_builder.cache import sha256_file

    print(f"{path}\nsha256 {sha256_file(path)}")


@task(help={"rootfs": "the rootfs to change, e.g. Linux_for_Tegra/rootfs",
            "overlay": "overlay tarball (default out/jetson-orin-nano/edgebake-overlay.tar.zst)",
            "remove": "take a previously applied overlay out again",
            "verify": "run the model self-check in the rootfs under qemu-user afterwards",
            "check": "run the static image checks that hold for an overlay on the rootfs"})
@fails_cleanly
def apply_overlay(c: Context, rootfs: str, overlay: str = "", remove: bool = False,
                  verify: bool = False, check: bool = False) -> None:
    """Apply the Jetson overlay to an L4T rootfs offline (idempotent), or remove it."""
    from edgebake_builder import overlayapply
    from edgebake_builder.preflight import require_root
    from edgebake_builder.progress import Progress

    progress = Progress(1)
    root = Path(rootfs).resolve()
    path = Path(overlay) if overlay else ROOT / "out" / "jetson-orin-nano" / \
        "edgebake-overlay.tar.zst"
    require_root()
    if remove:
        count = overlayapply.remove_overlay(root, progress)
        print(f"overlay removed from {root} ({count} files)" if count else
              f"{root}: no edgebake overlay applied; nothing to remove")
        return
    result = overlayapply.apply_overlay(path.resolve(), root, progress)
    print(f"overlay applied to {root}: {result['files']} files, {result['kept_aside']} "
          f"of the rootfs's kept aside for --remove, edgebake.service enabled")
    if not overlayapply.is_l4t(root):
        print("note: this rootfs does not look like L4T (no etc/nv_tegra_release)")
    if verify:
        print(f"self-check: {overlayapply.verify_in_rootfs(root, progress)}")
    if check:
        junit = path.resolve().parent / "test" / "junit-overlay.xml"
        if overlayapply.check_rootfs(root, path.resolve().parent / "manifest.json", junit,
                                     progress) != 0:
            raise Exit(f"static checks failed on {root} (see {junit})", code=1)
    print(overlayapply.NEXT_STEPS)


@task(help={"out": "private key file to write (the public key goes to <out>.pub)"})
@fails_cleanly
def make_key(c: Context, out: str = "signing.key") -> None:
    """Write an ed25519 keypair for signing model bundles (the private key mode 0600)."""
    from edgebake_builder.signing import write_private_key

    Path(f"{out}.pub").write_text(write_private_key(Path(out)))
    print(f"{out} (keep it secret) and {out}.pub (goes into recipes: update.public_keys)")


@task(help={"out": "folder for os-ca.crt (the units' keyring), os-ca.key, os.crt, os.key"})
@fails_cleanly
def make_os_key(c: Context, out: str = "keys") -> None:
    """Write the X.509 CA and signing key that system (RAUC) bundles are signed with."""
    from edgebake_builder.oskeys import make_os_keys

    ca, ca_key, cert, key = make_os_keys(Path(out))
    print(f"{ca}: the keyring images trust (recipe update.os_keyring, default "
          "keys/os-ca.crt)")
    print(f"{key} and {cert}: sign system bundles (build-image finds them beside it)")
    print(f"{ca_key}: issues new signing certificates; keep it offline")


@task(help={"model": ".tflite model to ship (default: the project's default model), or "
                     "models:/<name>@<alias> or models:/<name>/<version> with --registry",
            "registry": "the MLflow server's URL, for a models:/ reference",
            "key": "private key from make-key",
            "version": "bundle version, e.g. 1.4.2 (units only move forward)",
            "target": "recipe target the bundle is for (default pi4)",
            "out": "bundle file to write (.ebundle)",
            "card": "the model's card (default: made here, with golden outputs)",
            "fleet": "the units' fleet (recipe update.fleet)",
            "revoke": "id of a key the units stop trusting (repeatable; not the signing key)",
            "min_runtime": "oldest edgebake runtime version that may take it"},
       iterable=["revoke"])
@fails_cleanly
def make_bundle(c: Context, key: str, version: str, out: str, model: str = "",
                registry: str = "", target: str = "pi4", card: str = "",
                fleet: str = "default", revoke: list[str] | None = None,
                min_runtime: str = "") -> None:
    """A signed model bundle: model, card and golden outputs, manifest, ed25519 signature."""
    import tempfile

    from edgebake_builder.progress import Progress
    from edgebake_builder.registry.models import resolve
    from edgebake_builder.signing import build_bundle, read_private_key
    from edgebake_builder.steps.model import prepare_model
    from edgebake_runtime.atomic import write_atomic

    private = read_private_key(Path(key))
    try:
        with tempfile.TemporaryDirectory() as tmp:
            progress = Progress(1)
            source = resolve(model, registry, Path(tmp), progress)
            prepared = prepare_model(source.path, Path(tmp), progress, source.registry)
            card_path = Path(card) if card else prepared.card_path
            data = build_bundle({"model.tflite": prepared.model.read_bytes(),
                                 "model.card.json": card_path.read_bytes(),
                                 "model.golden.npz": prepared.golden_path.read_bytes()},
                                private, version, target, min_runtime, fleet, revoke or [],
                                source.registry)
        write_atomic(Path(out), data)
    except (OSError, ValueError) as exc:
        raise Exit(f"error: {exc}", code=1) from None
    origin = f" from {model} (version {source.registry['version']})" if source.registry \
        else ""
    print(f"{out}: version {version} for {target} in fleet {fleet}{origin}, {len(data)} "
          "bytes, signed")


@task(help={"model": "the converted .tflite (its card from convert-model goes with it)",
            "registry": "the MLflow server's URL",
            "name": "the registered model's name",
            "alias": "alias to point at the new version (repeatable; default champion)",
            "no_alias": "set no alias"},
      iterable=["alias"])
@fails_cleanly
def register_model(c: Context, model: str, registry: str, name: str,
                   alias: list[str] | None = None, no_alias: bool = False) -> None:
    """Log a converted model as a new registry version: card, golden outputs, and figures."""
    import tempfile

    from edgebake_builder.progress import Progress
    from edgebake_builder.registry.models import register_converted

    aliases = [] if no_alias else (alias or ["champion"])
    with tempfile.TemporaryDirectory() as tmp:
        answer = register_converted(Path(model), registry, name, aliases, Path(tmp),
                                    Progress(1))
    tagged = f", alias {', '.join(aliases)}" if aliases else ""
    print(f"registered {name} version {answer['version']} (run {answer['run_id']}){tagged}: "
          f"models:/{name}/{answer['version']} on {registry}")


@task(help={**BROKER_HELP, "host": "the unit's address (over SSH)",
            "out": "folder the samples go to (with manifest.jsonl)",
            "since": "only samples taken after this Unix time",
            "port": "SSH port (with --host), or the broker's (with --broker)",
            "user": "SSH user", "identity": "SSH private key file",
            "to": "with --broker: a unit's device id, or group/<name>",
            "key": "with --broker: private key the units trust (signs the share order)",
            "fleet": "the units' fleet", "wait": "seconds to wait for units to answer"})
@fails_cleanly
def collect_samples(c: Context, out: str, host: str = "", since: float = 0.0, port: int = 0,
                    user: str = "root", identity: str = "", broker: str = "", to: str = "",
                    key: str = "signing.key", fleet: str = "default", wait: float = 30.0,
                    username: str = "", password: str = "", ca_file: str = "") -> None:
    """Fetch units' field samples (SSH, or MQTT then HTTP), resumably, without duplicates."""
    from edgebake_builder.samples.collect import collect_samples as run_collect

    if bool(host) == bool(broker):
        raise Exit("error: expected --host UNIT (SSH) or --broker HOST --to UNIT|group/G",
                   code=1)
    if host:
        done = run_collect(host, Path(out), since, port or 22, user, identity)
        print(f"{host}: {done.fetched} sample(s) fetched, {done.already} already in {out}, "
              f"in {done.seconds:.0f} s")
        return
    from edgebake_builder.fleet import broker_of
    from edgebake_builder.samples.pull import describe, pull_samples

    if not to:
        raise Exit("error: --to: expected a unit's device id or group/<name>", code=1)
    results = pull_samples(broker_of(broker, port, username, password, ca_file),
                           Path(key), to, Path(out), fleet, since, wait_sec=wait)
    print("\n".join(describe(results, Path(out))) or f"no unit of {to} shared its samples")


@task(help={"samples": "folder of collected samples", "out": "the .npz to write",
            "labels": "CSV of name,label rows (then y holds class indices)",
            "size": "width,height of x (default: the --card's model input, else the first "
                    "sample's size)",
            "card": "the model's card, for its input size",
            "registry": "also log the .npz to this MLflow server", "name": "its run's name"})
@fails_cleanly
def samples_to_dataset(c: Context, samples: str, out: str, labels: str = "", size: str = "",
                       card: str = "", registry: str = "", name: str = "field-samples"
                       ) -> None:
    """Collected samples as the .npz convert-model takes (representative/validation data)."""
    from edgebake_builder.samples.dataset import samples_to_dataset as run_dataset
    from edgebake_builder.samples.dataset import size_from

    made = run_dataset(Path(samples), Path(out), size_from(size, card),
                       Path(labels) if labels else None)
    classes = f", classes {', '.join(made.classes)}" if made.classes else " (no labels)"
    print(f"{out}: {made.samples} samples of {made.size[0]}x{made.size[1]}{classes}")
    if registry:
        from edgebake_builder.registry.client import log_dataset

        run_id = log_dataset(registry, name, Path(out),
                             {"samples": str(made.samples), "classes": ",".join(made.classes)})
        print(f"logged to {registry} as run {run_id} (artifact dataset/{Path(out).name})")


@task(help={"port": "port on 127.0.0.1", "dir": "folder for its database and artifacts"})
@fails_cleanly
def registry_serve(c: Context, port: int = 5000, dir: str = "registry") -> None:
    """Run an MLflow model registry on 127.0.0.1 (SQLite, local artifacts) until Ctrl-C."""
    import time

    from edgebake_builder.registry.server import RegistryServer

    with RegistryServer.start(Path(dir), port) as server:
        print(f"MLflow registry on {server.uri} (data in {dir}/, log {server.log}); Ctrl-C "
              "stops it", flush=True)
        while server.proc.poll() is None:
            time.sleep(1)
        raise Exit(f"error: the MLflow server exited ({server.proc.returncode}); see "
                   f"{server.log}", code=1)


@task(help={"bundle": ".ebundle to check", "public_key": "trusted public key file(s)",
            "target": "the target it must be for", "current": "version the unit runs now",
            "allow_rollback": "accept an older version", "fleet": "the units' fleet"},
       iterable=["public_key"])
@fails_cleanly
def verify_bundle(c: Context, bundle: str, public_key: list[str], target: str = "pi4",
                  current: str = "", allow_rollback: bool = False, fleet: str = "default"
                  ) -> None:
    """Check a bundle with the code the unit uses: signature, members, target, version."""
    from edgebake_runtime.bundle import check_bundle, load_public_key

    try:
        keys = dict(load_public_key(Path(p).read_text(), p) for p in public_key)
    except OSError as exc:
        raise Exit(f"error: {exc}", code=1) from None
    found = check_bundle(Path(bundle), keys, target, current or None, allow_rollback,
                         fleet=fleet)
    print(f"{bundle}: ok, version {found.version} for {target} in fleet {fleet}, signed by "
          f"{found.manifest['key_id']}")
