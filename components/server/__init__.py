"""The Hetzner servers: SSH key, firewall (attached before first boot) and the servers themselves.

One server (the default) is registered exactly as it always was (`{name}-server`), so existing
stacks keep their URNs. Several servers are `{name}-server-1` ... `{name}-server-N` in a spread
placement group; server 1 carries an alias to `{name}-server`, so growing a one-server stack keeps
its server instead of replacing it. With several servers the web ports are not opened to the
world: the load balancer (components/balancer) reaches them over the private network, which
Hetzner firewalls do not filter.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pulumi
import pulumi_hcloud as hcloud
import yaml

from components.metadata_filter import bootcmd
from components.server.host_key import HostKey, user_data_with_host_key

CLOUD_INIT = Path(__file__).with_name("cloud-init.yaml")


class _Dumper(yaml.SafeDumper):
    """Multi-line strings (the bootcmd's script) as YAML literal blocks, readable as they are."""


_Dumper.add_representer(str, lambda d, v: d.represent_scalar("tag:yaml.org,2002:str", v, style="|" if "\n" in v else None))


def render_user_data(private_key: str, public_key: str) -> str:
    """The cloud-config of a created server: cloud-init.yaml, the metadata filter's bootcmd, the host key
    (the pristine-host tests boot a Debian root with exactly this, through cloud-init's NoCloud datasource)."""
    filter_block = yaml.dump({"bootcmd": bootcmd()}, Dumper=_Dumper, width=4096, sort_keys=False)
    return user_data_with_host_key(CLOUD_INIT.read_text().rstrip("\n") + "\n" + filter_block, private_key, public_key)


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
    count: int = 1


def firewall_rules(ssh_allowed_cidrs: tuple[str, ...], *, public_web: bool = True) -> list[hcloud.FirewallRuleArgs]:
    """SSH from the allowed CIDRs and ICMP from anywhere; HTTP(S) from anywhere only when the servers
    face the world themselves (`public_web`). Hetzner denies the rest inbound."""
    anywhere = ["0.0.0.0/0", "::/0"]
    rules = [hcloud.FirewallRuleArgs(direction="in", protocol="tcp", port="22", source_ips=list(ssh_allowed_cidrs), description="ssh")]
    if public_web:
        rules += [
            hcloud.FirewallRuleArgs(direction="in", protocol="tcp", port="80", source_ips=anywhere, description="http"),
            hcloud.FirewallRuleArgs(direction="in", protocol="tcp", port="443", source_ips=anywhere, description="https"),
        ]
    rules.append(hcloud.FirewallRuleArgs(direction="in", protocol="icmp", source_ips=anywhere, description="icmp"))
    return rules


class Server(pulumi.ComponentResource):
    """Long-lived servers: user data and SSH keys are ignored after creation so edits never replace them.

    `ipv4_address`/`ipv6_address`/`server_id` are the first server's; the lists hold every server's.
    `host_keys` are the public host keys the program generated, one per server, in server order.
    """

    ipv4_address: pulumi.Output[str]
    ipv6_address: pulumi.Output[str]
    server_id: pulumi.Output[str]
    ipv4_addresses: list[pulumi.Output[str]]
    server_ids: list[pulumi.Output[str]]
    host_keys: list[pulumi.Output[str]]

    def __init__(self, name: str, args: ServerArgs, opts: pulumi.ResourceOptions | None = None) -> None:
        super().__init__("cognivern:index:Server", name, {}, opts)
        if not 1 <= args.count <= 10:
            raise ValueError(f"Server count must be 1-10, got {args.count}")
        child = pulumi.ResourceOptions(parent=self)
        several = args.count > 1
        key = hcloud.SshKey(f"{name}-ssh-key", public_key=args.ssh_public_key, labels=args.labels, opts=child)
        firewall = hcloud.Firewall(
            f"{name}-firewall", rules=firewall_rules(args.ssh_allowed_cidrs, public_web=not several), labels=args.labels, opts=child
        )
        placement_group_id: pulumi.Output[int] | None = None
        if several:
            group = hcloud.PlacementGroup(f"{name}-placement-group", type="spread", labels=args.labels, opts=child)
            placement_group_id = group.id.apply(int)

        servers: list[hcloud.Server] = []
        self.host_keys = []
        for index in range(1, args.count + 1):
            resource_name = f"{name}-server-{index}" if several else f"{name}-server"
            host_key = HostKey(f"{name}-host-key-{index}" if several else f"{name}-host-key", pulumi.ResourceOptions(parent=self))
            self.host_keys.append(host_key.public_key)
            rendered: pulumi.Output[str] = pulumi.Output.all(host_key.private_key, host_key.public_key).apply(
                lambda keys: render_user_data(keys[0], keys[1])
            )
            user_data: pulumi.Output[str] = pulumi.Output.secret(rendered)
            aliases = [pulumi.Alias(name=f"{name}-server")] if several and index == 1 else None
            servers.append(
                hcloud.Server(
                    resource_name,
                    server_type=args.server_type,
                    image=args.image,
                    location=args.location,
                    ssh_keys=[key.id],
                    firewall_ids=[firewall.id.apply(int)],
                    placement_group_id=placement_group_id,
                    user_data=user_data,
                    backups=args.backups,
                    delete_protection=args.protect,
                    rebuild_protection=args.protect,
                    labels=args.labels if not several else {**args.labels, "index": str(index)},
                    public_nets=[hcloud.ServerPublicNetArgs(ipv4_enabled=True, ipv6_enabled=True)],
                    opts=pulumi.ResourceOptions(
                        parent=self, protect=args.protect, ignore_changes=["user_data", "ssh_keys", "image"], aliases=aliases
                    ),
                )
            )
        self.ipv4_addresses = [s.ipv4_address for s in servers]
        self.server_ids = [s.id for s in servers]
        self.ipv4_address = servers[0].ipv4_address
        self.ipv6_address = servers[0].ipv6_address
        self.server_id = servers[0].id
        outputs: dict[str, object] = {"ipv4Address": self.ipv4_address, "ipv6Address": self.ipv6_address, "serverId": self.server_id}
        if several:
            outputs.update(ipv4Addresses=self.ipv4_addresses, serverIds=self.server_ids)
        outputs["hostKeys"] = self.host_keys
        self.register_outputs(outputs)
