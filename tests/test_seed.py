"""The per-unit seed: applied whole at first boot, or not at all with one clear reason."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
from edgebake_builder.validate.seed import changed_chunks, put_seed_in_fat, render_seed
from edgebake_runtime.firstboot import apply_seed
from edgebake_runtime.seedcheck import SeedError

KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIJ6oB9bHt0pLq7d3m0Yl1f3S0oQm7bTqkQJ0Zk0m3nXv tech@laptop"


def make_etc(tmp_path: Path) -> Path:
    etc = tmp_path / "etc"
    (etc / "edgebake").mkdir(parents=True)
    (etc / "edgebake" / "app.yaml").write_text(
        "model:\n  path: /opt/edgebake/model/m.tflite\n"
        "sources:\n  - {name: pattern, kind: synthetic}\n")
    (etc / "hostname").write_text("edgebake\n")
    return etc


def test_valid_seed_is_applied(tmp_path: Path) -> None:
    etc = make_etc(tmp_path)
    seed = tmp_path / "edgebake-seed.yaml"
    seed.write_text(render_seed("pole-17", [KEY], app={"mqtt": {"enabled": True,
                                                                "host": "broker.lan"}},
                                device_id="pole-17"))
    summary = apply_seed(seed, etc)
    assert "hostname=pole-17" in summary and "1 ssh key" in summary
    assert (etc / "hostname").read_text() == "pole-17\n"
    assert "pole-17" in (etc / "hosts").read_text()
    keys = etc / "ssh" / "authorized_keys.d" / "root"
    assert keys.read_text().strip() == KEY and (keys.stat().st_mode & 0o777) == 0o600
    overrides = (etc / "edgebake" / "seed-overrides.yaml").read_text()
    assert "broker.lan" in overrides and "device_id: pole-17" in overrides


@pytest.mark.parametrize(("text", "message"), [
    ("hostname: Bad_Name\n", "hostname: expected lowercase"),
    ("ssh_authorized_keys: [password123]\n", "ssh_authorized_keys: expected a list of OpenSSH"),
    ("app:\n  mqtt:\n    port: 0\n", "mqtt.port: expected an integer between 1 and 65535"),
    ("wifi: {ssid: x}\n", "wifi.psk: expected a WPA passphrase"),
    ("wifi: {ssid: x, psk: longenough, country: de}\n", "wifi.country: expected a two-letter"),
    ('wifi: {ssid: "a\\"b", psk: longenough, country: DE}\n', "wifi.ssid: expected 1-32"),
    ("wifi: {ssid: x, psk: longenough, country: DE, key: 1}\n", "wifi: expected a mapping"),
    ("device_id: a/b\n", "device_id: expected a string of letters, digits"),
    ("app:\n  mqtt:\n    topic: a/+/b\n", "mqtt.topic: expected a string that is an MQTT topic"),
    ("hostname: one\nhostname: two\n", "key 'hostname' appears twice"),
    ("hostname: [\n", "not valid YAML"),
    ("update_public_keys: [ssh-ed25519 AAAA]\n", "update_public_keys: expected a list of keys"),
    ("mqtt_ca: not a certificate\n", "mqtt_ca: expected the broker's CA certificate(s) in PEM"),
])
def test_invalid_seed_changes_nothing(tmp_path: Path, text: str, message: str) -> None:
    etc = make_etc(tmp_path)
    before = {p: p.read_bytes() for p in etc.rglob("*") if p.is_file()}
    seed = tmp_path / "edgebake-seed.yaml"
    seed.write_text("hostname: good-name\n" + text if "hostname" not in text else text)
    with pytest.raises(SeedError) as caught:
        apply_seed(seed, etc)
    assert message in str(caught.value) and "\n" not in str(caught.value)
    after = {p: p.read_bytes() for p in etc.rglob("*") if p.is_file()}
    assert after == before


def test_update_keys_from_the_seed_join_the_recipe_keys(tmp_path: Path) -> None:
    etc = make_etc(tmp_path)
    seed = tmp_path / "edgebake-seed.yaml"
    key = "ed25519 " + "ab" * 32
    seed.write_text(render_seed("pole-18", [KEY], update_keys=[key]))
    assert "1 update key(s)" in apply_seed(seed, etc)
    written = (etc / "edgebake" / "update-keys" / "seed.pub").read_text()
    assert written.splitlines()[-1] == key


def test_the_brokers_ca_from_the_seed_is_written_and_used(tmp_path: Path) -> None:
    """A fleet's own broker CA travels in the seed: written beside the app config, and
    mqtt.tls.ca_file points at it unless the seed says otherwise."""
    from edgebake_builder.validate.broker import _certificates

    ca_file = _certificates(tmp_path, ("127.0.0.1",))[0]
    etc = make_etc(tmp_path)
    seed = tmp_path / "edgebake-seed.yaml"
    seed.write_text(render_seed("pole-19", [KEY], app={"mqtt": {
        "enabled": True, "host": "broker.lan", "tls": {"enabled": True}}},
        mqtt_ca=ca_file.read_text()))
    apply_seed(seed, etc)
    written = etc / "edgebake" / "mqtt-ca.pem"
    assert written.read_text().strip() == ca_file.read_text().strip()
    assert (written.stat().st_mode & 0o777) == 0o644
    overrides = (etc / "edgebake" / "seed-overrides.yaml").read_text()
    assert "ca_file: /etc/edgebake/mqtt-ca.pem" in overrides


def test_wifi_seed_writes_a_private_supplicant_file_and_enables_it(tmp_path: Path) -> None:
    etc = make_etc(tmp_path)
    seed = tmp_path / "edgebake-seed.yaml"
    seed.write_text("wifi: {ssid: Pole Net, psk: s3cret-pass, country: DE}\n")
    assert "wifi: Pole Net" in apply_seed(seed, etc)
    conf = etc / "wpa_supplicant" / "wpa_supplicant-wlan0.conf"
    assert (conf.stat().st_mode & 0o777) == 0o600
    text = conf.read_text()
    assert "country=DE" in text and 'ssid="Pole Net"' in text and 'psk="s3cret-pass"' in text
    link = etc / "systemd/system/multi-user.target.wants/wpa_supplicant@wlan0.service"
    assert link.is_symlink()


@pytest.mark.parametrize("encoding", ["utf-16", "utf-8-sig", "utf-16-be"])
def test_seed_saved_by_notepad_is_read(tmp_path: Path, encoding: str) -> None:
    """Windows editors save UTF-16 or UTF-8 with a byte-order mark."""
    etc = make_etc(tmp_path)
    seed = tmp_path / "edgebake-seed.yaml"
    text = "hostname: pole-ü\n".replace("ü", "u") + "device_id: pole-9\n"
    data = text.encode(encoding)
    if encoding == "utf-16-be":
        data = b"\xfe\xff" + data
    seed.write_bytes(data)
    assert "hostname=pole-u" in apply_seed(seed, etc)
    # `invoke flash` checks it on the host and puts it on the card as UTF-8 text
    from edgebake_builder.flashing.write import validate_seed_file

    assert validate_seed_file(seed) == text


def test_seed_in_an_unknown_encoding_is_refused_in_one_line(tmp_path: Path) -> None:
    etc = make_etc(tmp_path)
    seed = tmp_path / "edgebake-seed.yaml"
    seed.write_bytes("hostname: caf\xe9\n".encode("latin-1"))
    with pytest.raises(SeedError, match=r"not UTF-8 text \(byte 13"):
        apply_seed(seed, etc)


def test_first_boot_always_writes_keys_and_marker(tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """A seed that breaks in an unexpected way still leaves the done-marker behind."""
    from edgebake_runtime import firstboot

    seed = tmp_path / "boot" / "edgebake-seed.yaml"
    seed.parent.mkdir()
    seed.write_bytes(b"\xff\xfe\x00\xd8")  # a UTF-16 BOM and a lone surrogate
    monkeypatch.setattr(firstboot, "SEED", seed)
    monkeypatch.setattr(firstboot, "ETC", make_etc(tmp_path))
    monkeypatch.setattr(firstboot, "DONE", tmp_path / "state" / "firstboot.done")
    assert firstboot.main([]) == 0
    assert (tmp_path / "state" / "firstboot.done").read_text() == "done\n"
    assert list((tmp_path / "etc" / "ssh").glob("ssh_host_ed25519_key*"))


def test_first_boot_rerun_after_a_cut_mid_keygen_makes_the_keys_whole(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """As a power cut leaves them: an empty private key, a key without its .pub, and one whole
    key. A rerun of first boot keeps the whole key, removes the broken ones and makes the
    unit's own (ed25519) whole."""
    from edgebake_runtime import firstboot

    monkeypatch.setattr(firstboot, "SEED", tmp_path / "no-seed.yaml")
    etc = make_etc(tmp_path)
    monkeypatch.setattr(firstboot, "ETC", etc)
    monkeypatch.setattr(firstboot, "DONE", tmp_path / "state" / "firstboot.done")
    ssh = etc / "ssh"
    ssh.mkdir(parents=True, exist_ok=True)
    subprocess.run(["ssh-keygen", "-q", "-t", "ecdsa", "-N", "", "-f",
                    str(ssh / "ssh_host_ecdsa_key")], check=True)
    whole = (ssh / "ssh_host_ecdsa_key.pub").read_text()
    (ssh / "ssh_host_ed25519_key").write_bytes(b"")  # cut while writing
    subprocess.run(["ssh-keygen", "-q", "-t", "rsa", "-b", "1024", "-N", "", "-f",
                    str(ssh / "ssh_host_rsa_key")], check=True)
    (ssh / "ssh_host_rsa_key.pub").unlink()  # cut before the .pub
    assert firstboot.main([]) == 0
    assert (ssh / "ssh_host_ecdsa_key.pub").read_text() == whole
    key = ssh / "ssh_host_ed25519_key"
    assert key.stat().st_size > 0 and key.with_name(key.name + ".pub").is_file()
    assert subprocess.run(["ssh-keygen", "-y", "-f", str(key)], capture_output=True,
                          check=False).returncode == 0
    assert not (ssh / "ssh_host_rsa_key").exists()
    assert (tmp_path / "state" / "firstboot.done").read_text() == "done\n"


def test_seed_goes_into_a_fat_image_and_only_changed_chunks_differ(tmp_path: Path) -> None:
    fat = tmp_path / "boot.vfat"
    subprocess.run(["truncate", "-s", "64M", str(fat)], check=True)
    subprocess.run(["mkfs.vfat", "-F", "32", "-n", "EB_BOOT", str(fat)], check=True,
                   capture_output=True)
    original = tmp_path / "orig.vfat"
    original.write_bytes(fat.read_bytes())
    put_seed_in_fat(fat, render_seed("unit-1", [KEY]))
    listing = subprocess.run(["mtype", "-i", str(fat), "::/edgebake-seed.yaml"],
                             capture_output=True, text=True, check=True).stdout
    assert "hostname: unit-1" in listing
    chunks = changed_chunks(original, fat)
    assert chunks and sum(length for _, length in chunks) < 1024 * 1024


def test_machine_id_mounted_over_the_read_only_root_is_committed(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """As PID 1 leaves it on a read-only root: a generated id on a tmpfs, mounted over the
    image's 'uninitialized'. First boot writes that id under the mount and drops the mount.
    (The id must live on another filesystem, as /run does on a unit: a mount from the same
    filesystem is not a mount point to os.path.ismount, and the commit would never run.)"""
    from edgebake_runtime import firstboot

    etc = tmp_path / "root" / "etc"
    etc.mkdir(parents=True)
    (etc / "machine-id").write_text("uninitialized\n")
    run = tmp_path / "run"
    run.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(run)], check=True)
    try:
        generated = run / "machine-id"
        generated.write_text("0123456789abcdef0123456789abcdef\n")
        subprocess.run(["mount", "--bind", str(generated), str(etc / "machine-id")],
                       check=True)
        assert os.path.ismount(etc / "machine-id")
        monkeypatch.setattr(firstboot, "RUN_DIR", str(run))
        firstboot.commit_machine_id(etc)
        assert not os.path.ismount(etc / "machine-id")
        assert (etc / "machine-id").read_text() == "0123456789abcdef0123456789abcdef\n"
        assert (etc / "machine-id").stat().st_mode & 0o777 == 0o444
    finally:
        subprocess.run(["umount", str(etc / "machine-id")], capture_output=True, check=False)
        subprocess.run(["umount", "--lazy", str(run)], capture_output=True, check=False)
