"""Only root may reach Hetzner's metadata service, which serves the user data (holding the server's
SSH host key) to any local process, the app included.

One script, metadata-filter.sh, is the rule's only author. On servers the program creates,
cloud-init's bootcmd runs it at every boot (the first one included, before provisioning), and
provision.sh installs it with its unit, cognivern-metadata-filter.service (before
network-pre.target), and makes PM2's unit require and follow that unit, so the app never starts
before the filter; also on servers created before the unit existed, whose user data is ignored
after creation. Existing hosts (`host`/`hosts`) get neither unless `metadataFilter` asks
(Settings.filters_metadata): they may have no such service, and a PM2 unit requiring a unit that
does not exist would never start.

Its own package, so that components/host needs nothing of components/server (the Hetzner SDK).
The unit's header still names components/server/, where it lived: its bytes are part of
provisioning's trigger, and a new header would re-provision every server once for nothing.
"""

from __future__ import annotations

from pathlib import Path

HERE = Path(__file__).resolve().parent
SCRIPT = HERE / "metadata-filter.sh"
UNIT = HERE / "cognivern-metadata-filter.service"
SCRIPT_NAME = "cognivern-metadata-filter"  # installed as $BIN_DIR/<this>; the unit's ExecStart
UNIT_NAME = UNIT.name


def bootcmd() -> list[list[str]]:
    """cloud-init's bootcmd: the script itself, best effort (a first boot without nft or iptables
    warns instead of failing cloud-init; provisioning then installs nftables for the unit)."""
    return [["sh", "-c", SCRIPT.read_text(), SCRIPT_NAME, "--best-effort"]]
