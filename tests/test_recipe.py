"""Recipe loading: layering, merge rules, hashing, and one-line errors for bad recipes."""

from __future__ import annotations

from pathlib import Path

import pytest
from edgebake_builder.errors import BuildError, RecipeError
from edgebake_builder.recipe import load_recipe
from edgebake_builder.recipe.schema import SETTINGS, describe_all
from edgebake_builder.steps.bootstrap import base_key


def write(tmp_path: Path, text: str, name: str = "user.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_pi4_resolves_with_all_layers() -> None:
    recipe = load_recipe("pi4")
    assert recipe["arch"] == "arm64"
    assert "non-free-firmware" in recipe["components"]
    for package in ("linux-image-arm64", "raspi-firmware", "python3-numpy", "openssh-server",
                    "u-boot-rpi", "rauc", "rauc-service", "libubootenv-tool"):
        assert package in recipe["packages"]
    assert "edgebake.service" in recipe["services.enable"]
    assert recipe["layout.kind"] == "ab" and "panic=10" in recipe["kernel.cmdline"]
    assert recipe["wheels"] == ["paho-mqtt", "av"]
    assert "python3-cryptography" in recipe["packages"]
    assert recipe["runtime"] == "auto" and recipe["python.version"] == "3.11"
    assert [Path(s).stem for s in recipe.sources] == [
        "base", "kernel-pi4", "ab", "python", "app", "watchdog", "ssh", "slim", "pi4"]


def test_trixie_differs_only_where_trixie_differs() -> None:
    bookworm, trixie = load_recipe("pi4"), load_recipe("pi4-trixie")
    differing = {p for p in bookworm.values if bookworm[p] != trixie[p]}
    assert differing == {"name", "description", "suite", "python.version", "python.glibc",
                         "systemd.version"}
    assert trixie["suite"] == "trixie" and trixie["python.version"] == "3.13"
    assert base_key(trixie) != base_key(bookworm)


def test_wheel_lock_selects_per_python() -> None:
    from edgebake_builder.steps.wheels import Target, read_wheels_lock, select_wheels, wheel_for

    lock = read_wheels_lock()
    bookworm, trixie, jetpack = Target("3.11", "2.36"), Target("3.13", "2.41"), \
        Target("3.10", "2.35")
    for target in (bookworm, trixie, jetpack):
        litert = wheel_for("ai-edge-litert", lock, target)
        assert litert is not None and litert.python == target.python
        assert wheel_for("paho_mqtt", lock, target) is not None
    assert wheel_for("tflite-runtime", lock, trixie) is None
    assert wheel_for("tflite-runtime", lock, jetpack) is not None
    with pytest.raises(BuildError, match=r"has no wheel for Python 3\.13"):
        select_wheels(["tflite-runtime"], lock, trixie)
    args = trixie.pip_args()
    assert "manylinux_2_41_aarch64" in args and "manylinux_2_17_aarch64" in args
    assert "cp313" in args


def test_auto_runtime_choice_names_its_reason() -> None:
    from edgebake_builder.steps.model import choose_runtime

    both_ok = {"runtimes": {"tflite-runtime": {"ok": True, "version": "2.14.0"},
                            "ai-edge-litert": {"ok": True, "version": "2.3.0"}}}
    old_fails = {"file": "m.tflite", "runtimes": {
        "tflite-runtime": {"ok": False, "version": "2.14.0",
                           "error": "Didn't find op for builtin opcode 'X' version '9'"},
        "ai-edge-litert": {"ok": True, "version": "2.3.0"}}}
    wheels = ["tflite-runtime", "ai-edge-litert"]
    assert choose_runtime("auto", both_ok, wheels, "3.11").name == "tflite-runtime"
    picked = choose_runtime("auto", old_fails, wheels, "3.11")
    assert picked.name == "ai-edge-litert" and "opcode 'X' version '9'" in picked.reason
    no_wheel = choose_runtime("auto", both_ok, ["ai-edge-litert"], "3.13")
    assert no_wheel.name == "ai-edge-litert" and "no wheel for Python 3.13" in no_wheel.reason
    with pytest.raises(BuildError, match=r"tflite-runtime 2.14.0: Didn't find op .* '9'"):
        choose_runtime("tflite-runtime", old_fails, wheels, "3.11")


def test_hash_is_stable_and_content_based(tmp_path: Path) -> None:
    first, second = load_recipe("pi4"), load_recipe("pi4")
    assert first.sha256() == second.sha256()
    changed = load_recipe("pi4", write(tmp_path, "hostname: other-unit\n"))
    assert changed.sha256() != first.sha256()


def test_app_and_model_changes_keep_the_base_key(tmp_path: Path) -> None:
    plain = load_recipe("pi4")
    app_only = load_recipe("pi4", write(tmp_path, "app:\n  inference:\n    num_threads: 4\n"
                                        "layout:\n  data_mib: 256\n"))
    assert base_key(app_only) == base_key(plain)
    more_packages = load_recipe("pi4", write(tmp_path, "packages: [curl]\n", "p.yaml"))
    assert base_key(more_packages) != base_key(plain)


def test_lists_append_and_minus_removes(tmp_path: Path) -> None:
    recipe = load_recipe("pi4", write(tmp_path, "packages: [curl, -openssh-server]\n"))
    assert "curl" in recipe["packages"]
    assert "openssh-server" not in recipe["packages"]
    assert recipe["packages"].count("python3") == 1


def test_mappings_deep_merge(tmp_path: Path) -> None:
    recipe = load_recipe("pi4", write(tmp_path, "app:\n  http:\n    port: 9000\n"))
    assert recipe["app"]["http"] == {"port": 9000}
    assert recipe["app"]["sources"][0]["kind"] == "v4l2-auto"


@pytest.mark.parametrize(("text", "field", "expected"), [
    ("layout:\n  boot_mib: 8\n", "layout.boot_mib", "an integer between 64 and 2048"),
    ("layout:\n  boot_mib: big\n", "layout.boot_mib", "an integer"),
    ("arch: amd64\n", "arch", "one of arm64"),
    ("packages: curl\n", "packages", "a list of"),
    ("packages: [Not_A_Package]\n", "packages", "naming a Debian package"),
    ("ssh:\n  authorized_keys: [hunter2]\n", "ssh.authorized_keys", "holding a public key"),
    ("kernel: 5\n", "kernel", "a mapping"),
    ('kernel:\n  cmdline: ["quiet\\ninit=/bin/sh"]\n', "kernel.cmdline", "one argument"),
    ("kernel:\n  cmdline: [a b]\n", "kernel.cmdline", "one argument"),
    ('firmware:\n  config_txt: ["a=1\\nb=2"]\n', "firmware.config_txt", "one line"),
    ("suite: sid\n", "suite", "one of bookworm, trixie"),
    ("runtime: tensorflow\n", "runtime", "one of auto, tflite-runtime, ai-edge-litert"),
    ("python:\n  version: '3.12'\n", "python.version", "one of 3.10, 3.11, 3.13"),
    ("update:\n  public_keys: [ssh-ed25519 AAAA]\n", "update.public_keys", "ed25519 <64 hex"),
    ("output: iso\n", "output", "one of disk-image, overlay"),
    ("network:\n  allow: [10.0.0.300/8]\n", "network.allow", "a network like 10.0.0.0/8"),
    ("update:\n  fleet: North Site\n", "update.fleet", "of lowercase letters"),
    ("systemd:\n  version: 99\n", "systemd.version", "an integer between 240 and 400"),
])
def test_bad_values_name_file_field_and_expectation(tmp_path: Path, text: str, field: str,
                                                    expected: str) -> None:
    path = write(tmp_path, text)
    with pytest.raises(RecipeError) as caught:
        load_recipe("pi4", path)
    message = str(caught.value)
    assert message.startswith(f"{path}: {field}: expected ")
    assert expected in message
    assert "\n" not in message


def test_unknown_key_is_an_error_with_a_suggestion(tmp_path: Path) -> None:
    path = write(tmp_path, "layout:\n  data_mb: 64\n")
    with pytest.raises(BuildError, match=r"user.yaml: layout.data_mb: unknown setting; "
                                         r"did you mean 'layout.data_mib'"):
        load_recipe("pi4", path)


def test_invalid_yaml_and_missing_files(tmp_path: Path) -> None:
    with pytest.raises(BuildError, match=r"line 2.*not valid YAML"):
        load_recipe("pi4", write(tmp_path, "name: x\n  bad: [\n"))
    with pytest.raises(BuildError, match=r"recipe file not found"):
        load_recipe("pi4", tmp_path / "nope.yaml")
    with pytest.raises(BuildError, match=r"unknown target 'pi9'; available: .*pi4"):
        load_recipe("pi9")
    with pytest.raises(RecipeError, match=r"layers: expected one of .*base"):
        load_recipe("pi4", write(tmp_path, "layers: [nosuchlayer]\n", "l.yaml"))


def test_app_settings_are_checked_before_building(tmp_path: Path) -> None:
    from edgebake_builder.build import check_app_config

    recipe = load_recipe("pi4", write(tmp_path, "app:\n  inference:\n    num_threads: 17\n"))
    with pytest.raises(BuildError,
                       match=r"recipe: app: inference.num_threads: expected an integer"):
        check_app_config(recipe)


def test_model_path_is_relative_to_the_recipe(tmp_path: Path) -> None:
    recipe = load_recipe("pi4", write(tmp_path, "model:\n  path: models/m.tflite\n"))
    assert recipe["model.path"] == str(tmp_path / "models" / "m.tflite")


def test_schema_documents_every_setting() -> None:
    text = describe_all()
    for setting in SETTINGS:
        assert setting.path in text and setting.help
        assert setting.validator.validate(setting.default) == setting.default


@pytest.mark.parametrize(("data", "expected"), [
    (b"hostname: a\nhostname: b\n", "key 'hostname' appears twice"),
    ("hostname: caf\xe9\n".encode("latin-1"), "not UTF-8 text (byte 13"),
])
def test_unreadable_recipe_is_one_line(tmp_path: Path, data: bytes, expected: str) -> None:
    path = tmp_path / "user.yaml"
    path.write_bytes(data)
    with pytest.raises(BuildError) as caught:
        load_recipe("pi4", path)
    assert str(caught.value).startswith(str(path)) and expected in str(caught.value)
    assert "\n" not in str(caught.value)


def test_utf16_recipe_is_read(tmp_path: Path) -> None:
    path = tmp_path / "user.yaml"
    path.write_bytes("hostname: from-notepad\n".encode("utf-16"))
    assert load_recipe("pi4", path)["hostname"] == "from-notepad"


def test_vendor_base_targets_choose_their_own_layers() -> None:
    on_debian = load_recipe("pi4")
    on_vendor = load_recipe("pi4", base_image=True)
    assert "linux-image-arm64" in on_debian["packages"]
    assert "linux-image-arm64" not in on_vendor["packages"]
    assert "python3-numpy" in on_vendor["packages"]
    assert on_vendor["layout.boot_mib"] == 512 and on_vendor.base_image
    assert load_recipe("pi5", base_image=True)["firmware.requires"] == [
        "kernel_2712.img", "bcm2712-rpi-5-b.dtb"]
    with pytest.raises(BuildError, match="pi5: needs a vendor image"):
        load_recipe("pi5")
    with pytest.raises(BuildError, match="pi4-trixie: cannot be built on a vendor image"):
        load_recipe("pi4-trixie", base_image=True)


@pytest.mark.parametrize("allow", [[], ["10.0.0.0/8", "192.168.1.20", "fd00::/8"]])
def test_network_allow_fences_the_service_in(tmp_path: Path, allow: list[str]) -> None:
    """recipe network.allow becomes IPAddressDeny=any plus the allowed networks (localhost
    always) in the service's unit; without it the service's network is not fenced."""
    from edgebake_builder.steps.overlays import OVERLAYS_DIR, make_environment

    recipe = load_recipe("pi4", write(tmp_path, f"network:\n  allow: {allow}\n"))
    unit = make_environment(OVERLAYS_DIR).get_template(
        "app/usr/lib/systemd/system/edgebake.service.j2").render(recipe=recipe.as_nested())
    fenced = [line for line in unit.splitlines() if line.startswith("IPAddress")]
    assert fenced == (["IPAddressDeny=any", "IPAddressAllow=localhost " + " ".join(allow)]
                      if allow else []), fenced
