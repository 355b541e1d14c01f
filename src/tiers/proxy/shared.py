"""What every client connection of a proxy process reads for each request.

``ProxyServer`` owns these parts and swaps them on reload; it keeps them in
one ``Shared`` object and its attributes of the same names stand for this
object's (``server.cache`` is ``server.shared.cache``). Connections read
them from here: in the compiled build a field of a native object, where an
attribute of the interpreted server would be a dictionary lookup, a dozen
times per request.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from tiers.proxy.accesslog import AccessLog, RequestIds
from tiers.proxy.cache import PageCache
from tiers.proxy.limits import Abuse
from tiers.proxy.observe import RequestCounters
from tiers.proxy.routing import Router
from tiers.proxy.settings import ProxySettings
from tiers.proxy.writebatch import WriteBatch

if TYPE_CHECKING:
    from tiers.proxy.upstream import Pools


class Shared:
    """The parts of a proxy process that its connections use per request.

    ``max_body_size`` follows ``settings`` (the policy's limit, 0 for none).
    """

    def __init__(
        self,
        settings: ProxySettings,
        router: Router,
        abuse: Abuse,
        pools: Pools,
        cache: PageCache,
    ) -> None:
        self._settings = settings
        self.max_body_size = settings.policy.max_body_size
        self.router = router
        self.abuse = abuse
        self.pools = pools
        self.cache = cache
        self.request_ids = RequestIds()
        self.counters = RequestCounters()
        # The callback paths' writes, sent together at the end of each loop iteration.
        self.writes = WriteBatch()
        self.access_log: AccessLog | None = None
        self.stopping = False

    @property
    def settings(self) -> ProxySettings:
        return self._settings

    @settings.setter
    def settings(self, settings: ProxySettings) -> None:
        self._settings = settings
        self.max_body_size = settings.policy.max_body_size
