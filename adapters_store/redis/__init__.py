"""What ptserve keeps in Redis: the shared adapter store (``RedisStore``) and the tenant keys beside it, one
module per concern — the connection, its URL options and error mapping (``connection``), the key layout
(``layout``), the Lua scripts that publish and delete versions (``scripts``), reading versions back (``blobs``),
the per-tenant index (``tenant_index``), the all-tenants SCAN listing (``listing``), the change feed (``feed``),
the store composing them (``store``) and the key store (``api_keys``)."""
from ptserve.adapters_store.redis.store import RedisStore

__all__ = ["RedisStore"]
