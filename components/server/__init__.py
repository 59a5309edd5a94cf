"""The Hetzner server: SSH key, firewall (attached before first boot) and the server itself."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pulumi
import pulumi_hcloud as hcloud

CLOUD_INIT = Path(__file__).with_name("cloud-init.yaml")


@dataclass(frozen=True)
class ServerArgs:
    ssh_public_key: str
    ssh_allowed_cidrs: tuple[str, ...]
    server_type: str
    location: str
    image: str
    backups: bool
    protect: bool
    labels: dict[str, str]


def firewall_rules(ssh_allowed_cidrs: tuple[str, ...]) -> list[hcloud.FirewallRuleArgs]:
    """SSH from the allowed CIDRs, HTTP(S) and ICMP from anywhere; Hetzner denies the rest inbound."""
    anywhere = ["0.0.0.0/0", "::/0"]
    return [
        hcloud.FirewallRuleArgs(direction="in", protocol="tcp", port="22", source_ips=list(ssh_allowed_cidrs), description="ssh"),
        hcloud.FirewallRuleArgs(direction="in", protocol="tcp", port="80", source_ips=anywhere, description="http"),
        hcloud.FirewallRuleArgs(direction="in", protocol="tcp", port="443", source_ips=anywhere, description="https"),
        hcloud.FirewallRuleArgs(direction="in", protocol="icmp", source_ips=anywhere, description="icmp"),
    ]


class Server(pulumi.ComponentResource):
    """A long-lived server: user data and SSH keys are ignored after creation so edits never replace it."""

    ipv4_address: pulumi.Output[str]
    ipv6_address: pulumi.Output[str]
    server_id: pulumi.Output[str]

    def __init__(self, name: str, args: ServerArgs, opts: pulumi.ResourceOptions | None = None) -> None:
        super().__init__("cognivern:index:Server", name, {}, opts)
        child = pulumi.ResourceOptions(parent=self)
        key = hcloud.SshKey(f"{name}-ssh-key", public_key=args.ssh_public_key, labels=args.labels, opts=child)
        firewall = hcloud.Firewall(f"{name}-firewall", rules=firewall_rules(args.ssh_allowed_cidrs), labels=args.labels, opts=child)
        server = hcloud.Server(
            f"{name}-server",
            server_type=args.server_type,
            image=args.image,
            location=args.location,
            ssh_keys=[key.id],
            firewall_ids=[firewall.id.apply(int)],
            user_data=CLOUD_INIT.read_text(),
            backups=args.backups,
            delete_protection=args.protect,
            rebuild_protection=args.protect,
            labels=args.labels,
            public_nets=[hcloud.ServerPublicNetArgs(ipv4_enabled=True, ipv6_enabled=True)],
            opts=pulumi.ResourceOptions(parent=self, protect=args.protect, ignore_changes=["user_data", "ssh_keys", "image"]),
        )
        self.ipv4_address = server.ipv4_address
        self.ipv6_address = server.ipv6_address
        self.server_id = server.id
        self.register_outputs({"ipv4Address": self.ipv4_address, "ipv6Address": self.ipv6_address, "serverId": self.server_id})
