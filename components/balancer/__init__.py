"""A Hetzner load balancer in front of several servers, over a private network.

Children (all `{name}-<role>`): the private network and its cloud subnet (in the network zone of
the servers' location), one attachment per server at a fixed private address, the load balancer
(attached to the network), one target per server reached over its private address, and the HTTP
service 80 -> 80 whose health check asks each server's nginx for `health_path`. Hetzner firewalls
do not filter private-network traffic, so the servers' firewall keeps 80/443 closed to the world
and the balancer still reaches them.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence
from dataclasses import dataclass

import pulumi
import pulumi_hcloud as hcloud

NETWORK_RANGE = "10.0.0.0/16"
SUBNET_RANGE = "10.0.1.0/24"
BALANCER_IP = "10.0.1.2"  # 10.0.1.1 is the subnet's gateway
FIRST_SERVER_HOST = 11  # server i gets 10.0.1.(10 + i)

# Health check: interval/timeout in seconds; Hetzner allows retries 1-5. An unhealthy target needs
# as many passing checks to come back. 5 s x 3 takes a dead server out within ~15 s.
HEALTH_INTERVAL = 5
HEALTH_TIMEOUT = 3
HEALTH_RETRIES = 3


def private_ip(index: int) -> str:
    """The fixed private address of server `index` (1-based)."""
    return str(ipaddress.ip_network(SUBNET_RANGE)[FIRST_SERVER_HOST - 1 + index])


@dataclass(frozen=True)
class BalancerArgs:
    server_ids: Sequence[pulumi.Input[str]]
    location: str
    network_zone: str
    load_balancer_type: str
    health_path: str
    labels: dict[str, str]
    protect: bool
    domain: str | None = None  # Host header of the health check (nginx server_name), None: the target's address
    tls_domain: str | None = None  # HTTPS on the balancer with a Hetzner managed certificate; HTTP redirects to it


class Balancer(pulumi.ComponentResource):
    ipv4_address: pulumi.Output[str]
    ipv6_address: pulumi.Output[str]
    private_ips: list[str]

    def __init__(self, name: str, args: BalancerArgs, opts: pulumi.ResourceOptions | None = None) -> None:
        super().__init__("cognivern:index:Balancer", name, {}, opts)
        if not 2 <= len(args.server_ids) <= 10:
            raise ValueError(f"a balancer needs 2-10 servers, got {len(args.server_ids)}")
        network_id, subnet, attachments = self._network(name, args)
        balancer = hcloud.LoadBalancer(
            f"{name}-lb",
            load_balancer_type=args.load_balancer_type,
            location=args.location,
            algorithm=hcloud.LoadBalancerAlgorithmArgs(type="round_robin"),
            delete_protection=args.protect,
            labels=args.labels,
            opts=pulumi.ResourceOptions(parent=self, protect=args.protect),
        )
        lb_network = hcloud.LoadBalancerNetwork(
            f"{name}-lb-network",
            load_balancer_id=balancer.id.apply(int),
            network_id=network_id,
            ip=BALANCER_IP,
            enable_public_interface=True,
            opts=pulumi.ResourceOptions(parent=self, depends_on=[subnet]),
        )
        for index, (server_id, attachment) in enumerate(zip(args.server_ids, attachments, strict=True), start=1):
            hcloud.LoadBalancerTarget(
                f"{name}-target-{index}",
                load_balancer_id=balancer.id.apply(int),
                type="server",
                server_id=pulumi.Output.from_input(server_id).apply(int),
                use_private_ip=True,
                # over the private network: both ends must be attached first
                opts=pulumi.ResourceOptions(parent=self, depends_on=[lb_network, attachment]),
            )
        self._service(name, args, balancer)
        self.ipv4_address = balancer.ipv4
        self.ipv6_address = balancer.ipv6
        self.register_outputs({"ipv4Address": self.ipv4_address, "ipv6Address": self.ipv6_address, "privateIps": self.private_ips})

    def _network(self, name: str, args: BalancerArgs) -> tuple[pulumi.Output[int], hcloud.NetworkSubnet, list[hcloud.ServerNetwork]]:
        """The private network, its subnet, and each server attached at its private address."""
        network = hcloud.Network(
            f"{name}-network",
            ip_range=NETWORK_RANGE,
            delete_protection=args.protect,
            labels=args.labels,
            opts=pulumi.ResourceOptions(parent=self, protect=args.protect),
        )
        network_id = network.id.apply(int)
        subnet = hcloud.NetworkSubnet(
            f"{name}-subnet",
            network_id=network_id,
            type="cloud",
            network_zone=args.network_zone,
            ip_range=SUBNET_RANGE,
            opts=pulumi.ResourceOptions(parent=self),
        )
        self.private_ips = [private_ip(i) for i in range(1, len(args.server_ids) + 1)]
        attachments = [
            hcloud.ServerNetwork(
                f"{name}-server-{index}-network",
                server_id=pulumi.Output.from_input(server_id).apply(int),
                network_id=network_id,
                ip=ip,
                opts=pulumi.ResourceOptions(parent=self, depends_on=[subnet]),
            )
            for index, (server_id, ip) in enumerate(zip(args.server_ids, self.private_ips, strict=True), start=1)
        ]
        return network_id, subnet, attachments

    def _service(self, name: str, args: BalancerArgs, balancer: hcloud.LoadBalancer) -> None:
        """HTTP 80 -> 80, or with a domain HTTPS 443 -> 80 (Hetzner managed certificate, HTTP redirected)."""
        health_check = hcloud.LoadBalancerServiceHealthCheckArgs(
            protocol="http",
            port=80,
            interval=HEALTH_INTERVAL,
            timeout=HEALTH_TIMEOUT,
            retries=HEALTH_RETRIES,
            http=hcloud.LoadBalancerServiceHealthCheckHttpArgs(path=args.health_path, domain=args.domain, status_codes=["2??"]),
        )
        child = pulumi.ResourceOptions(parent=self)
        https = None
        if args.tls_domain is not None:
            # Hetzner issues and renews the certificate (Let's Encrypt) once DNS points at the balancer;
            # redirect_http answers port 80 with a redirect, so there is no plain-HTTP service.
            certificate = hcloud.ManagedCertificate(f"{name}-certificate", domain_names=[args.tls_domain], labels=args.labels, opts=child)
            https = hcloud.LoadBalancerServiceHttpArgs(certificates=[certificate.id.apply(int)], redirect_http=True)
        hcloud.LoadBalancerService(
            f"{name}-http" if https is None else f"{name}-https",
            load_balancer_id=balancer.id,
            protocol="http" if https is None else "https",
            listen_port=80 if https is None else 443,
            destination_port=80,
            http=https,
            health_check=health_check,
            opts=child,
        )
