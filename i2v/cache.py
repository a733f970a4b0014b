"""Django's Redis cache, minus two per-call costs.

Django's `RedisCacheClient.get_client()` builds a new `redis.Redis` for every cache call, and
building one fills a table of ~200 response callbacks: ~0.4 ms of CPU, more than the Redis round
trip itself, on every cached read of `GET /api/jobs/{id}`. A `redis.Redis` is safe to share
between threads (each command takes a connection from the pool), so this keeps one per pool.

And Django keeps a cache backend per thread, each with connection pools of its own. Under ASGI
every request runs its sync code in a thread of its own, so every request's first cache call
opened a new TCP connection to Redis (~1.5 ms of CPU, then left to the garbage collector). The
pools here are the process's, shared by every thread (redis-py's pools are thread-safe, and
reset themselves in a forked child)."""

import threading

from django.core.cache.backends import redis as django_redis

_clients = {}  # (server URL, pool options) -> the process's redis.Redis, on the process's pool for it
_lock = threading.Lock()


class RedisCacheClient(django_redis.RedisCacheClient):
    def get_client(self, key=None, *, write=False):
        server = self._servers[self._get_connection_pool_index(write)]
        found = (server, repr(sorted(self._pool_options.items())))
        client = _clients.get(found)
        if client is None:
            with _lock:
                client = _clients.get(found)
                if client is None:
                    pool = self._pool_class.from_url(server, **self._pool_options)
                    client = _clients[found] = self._client(connection_pool=pool)
        return client

    def _get_connection_pool(self, write):
        return self.get_client(write=write).connection_pool


class RedisCache(django_redis.RedisCache):
    def __init__(self, server, params):
        super().__init__(server, params)
        self._class = RedisCacheClient
