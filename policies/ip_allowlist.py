"""IP allowlists: who may call the API (`policies.ip_allowlist.api`) and /admin (`.admin`)."""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable

from app.errors import IpNotAllowed
from policies.context import RequestContext

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


def parse_address(text: str) -> IPAddress | None:
    """`text` as an address, IPv4-mapped IPv6 (`::ffff:10.0.0.1`) as IPv4; None if not one."""
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


class AddressSet:
    """IPv4 and IPv6 networks parsed once into integer masks; membership is a few AND/compares.

    IPv4-mapped IPv6 addresses and networks (`::ffff:10.0.0.0/104`) count as IPv4. Clients
    come back, so what each address string resolved to is remembered (a bounded memo).
    """

    __slots__ = ("_memo", "_v4", "_v6")

    MEMO_SIZE = 4096
    """Address strings remembered; the memo starts over when full."""

    def __init__(self, entries: Iterable[str]) -> None:
        v4: list[tuple[int, int]] = []
        v6: list[tuple[int, int]] = []
        for entry in entries:
            network = ipaddress.ip_network(entry, strict=False)
            if isinstance(network, ipaddress.IPv6Network) and network.prefixlen >= 96:
                mapped = network.network_address.ipv4_mapped
                if mapped is not None:
                    network = ipaddress.IPv4Network(f"{mapped}/{network.prefixlen - 96}")
            target = v4 if network.version == 4 else v6
            target.append((int(network.network_address), int(network.netmask)))
        self._v4 = tuple(v4)
        self._v6 = tuple(v6)
        self._memo: dict[str, tuple[bool, str] | None] = {}

    def __bool__(self) -> bool:
        return bool(self._v4 or self._v6)

    def __contains__(self, address: object) -> bool:
        if isinstance(address, str):
            found = self.lookup(address)
            return found is not None and found[0]
        if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
            address = address.ipv4_mapped
        if isinstance(address, ipaddress.IPv4Address):
            networks = self._v4
        elif isinstance(address, ipaddress.IPv6Address):
            networks = self._v6
        else:
            return False
        value = int(address)
        return any(value & mask == network for network, mask in networks)

    def lookup(self, host: str) -> tuple[bool, str] | None:
        """Whether `host` is inside, and its canonical form; None when it is no IP address."""
        memo = self._memo
        try:
            return memo[host]
        except KeyError:
            pass
        address = parse_address(host)
        found = None if address is None else (address in self, str(address))
        if len(memo) >= self.MEMO_SIZE:
            memo.clear()
        memo[host] = found
        return found


class IpAllowlistPolicy:
    """Refuse clients whose address is outside the list (403 ip_not_allowed); empty allows all.

    First in the policy chain, so a client outside the list learns nothing, not even whether
    its key is good. `Edge` uses a second instance for /admin and /metrics.
    """

    name = "ip_allowlist"

    def __init__(self, allowed: Iterable[str], *, scope: str = "API") -> None:
        self.allowed = AddressSet(allowed)
        self.scope = scope
        """What the list guards, for the error message (`API`, `admin`)."""

    def permits(self, client_ip: str) -> bool:
        """Whether `client_ip` may pass (anything that is not an IP address may not)."""
        return not self.allowed or client_ip in self.allowed

    def refusal(self, client_ip: str) -> IpNotAllowed:
        """The error answering a client this list keeps out."""
        shown = client_ip if parse_address(client_ip) is not None else "this address"
        return IpNotAllowed(f"{self.scope} requests from {shown} are not allowed")

    async def check(self, ctx: RequestContext) -> None:
        """Raise 403 ip_not_allowed unless the client's address is allowed."""
        if not self.permits(ctx.client_ip):
            raise self.refusal(ctx.client_ip)
