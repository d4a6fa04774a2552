"""NoCloud seeds for the VM test: the shipped user-data, unchanged, plus a test-only part with
the endpoint settings a test needs (moto instead of AWS), merged by cloud-init itself."""

from __future__ import annotations

from email.mime.multipart import MIMEMultipart
from email.mime.text import MIMEText
from pathlib import Path

from tests.system.vm.image import run

# Where the guest reaches the host's moto server: a guestfwd address on the first NIC.
MOTO_GUEST_ADDR = "10.0.2.100"
MOTO_GUEST_PORT = 80
MAC_MAIN = "52:54:00:12:34:01"
MAC_IMDS = "52:54:00:12:34:02"

# Appended to the shipped user-data's lists instead of replacing them (cloud-init's default
# merge replaces a list given again, which would drop the shipped write_files).
TEST_PART = f"""\
#cloud-config
merge_how:
  - name: list
    settings: [append]
  - name: dict
    settings: [no_replace, recurse_list]
write_files:
  - path: /etc/default/hostagent
    permissions: "0600"
    content: |
      # VM test only: AWS is a moto server on the test host; credentials are moto's dummies.
      AWS_ENDPOINT_URL=http://{MOTO_GUEST_ADDR}:{MOTO_GUEST_PORT}
      AWS_ACCESS_KEY_ID=testing
      AWS_SECRET_ACCESS_KEY=testing
"""

# eth0: the default route (DHCP from qemu); eth1: the link to 169.254.169.254 (IMDS).
NETWORK_CONFIG = f"""\
version: 2
ethernets:
  eth0:
    match:
      macaddress: "{MAC_MAIN}"
    set-name: eth0
    dhcp4: true
  eth1:
    match:
      macaddress: "{MAC_IMDS}"
    set-name: eth1
    addresses: [169.254.0.15/16]
"""


def config_appendix(toml: str) -> str:
    """A write_files entry appending TOML tables to the shipped /etc/hostagent/hostagent.toml (it
    comes after the shipped entry in the merged list, so the file exists by then)."""
    body = "".join(f"      {line}\n" for line in toml.splitlines())
    return ("  - path: /etc/hostagent/hostagent.toml\n"
            "    append: true\n"
            "    content: |\n"
            "      # VM test only, appended to the shipped configuration:\n" + body)


def user_data_mime(shipped: str, hostagent_toml_extra: str = "") -> str:
    test_part = TEST_PART + (config_appendix(hostagent_toml_extra) if hostagent_toml_extra else "")
    msg = MIMEMultipart()
    for name, body in (("user-data.yaml", shipped), ("vmtest-endpoints.yaml", test_part)):
        part = MIMEText(body, "cloud-config")
        part.add_header("Content-Disposition", "attachment", filename=name)
        msg.attach(part)
    return msg.as_string()


def make_seed(directory: Path, *, instance_id: str, shipped_user_data: str,
              hostagent_toml_extra: str = "") -> Path:
    """seed.iso (volume label cidata) with meta-data naming the EC2 instance id, as EC2 would;
    hostagent_toml_extra: TOML tables the test adds to the shipped hostagent.toml (e.g. [agent])."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "user-data").write_text(user_data_mime(shipped_user_data, hostagent_toml_extra))
    (directory / "meta-data").write_text(f"instance-id: {instance_id}\nlocal-hostname: vmtest\n")
    (directory / "network-config").write_text(NETWORK_CONFIG)
    iso = directory / "seed.iso"
    run(["cloud-localds", "-N", directory / "network-config", iso, directory / "user-data",
         directory / "meta-data"])
    return iso
