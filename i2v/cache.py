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

_pools = {}  # (server URL, options) -> the process's pool
_clients = {}  # id(pool) -> a redis.Redis on it
_lock = threading.Lock()


class RedisCacheClient(django_redis.RedisCacheClient):
    def _get_connection_pool(self, write):
        index = self._get_connection_pool_index(write)
        key = (self._servers[index], repr(sorted(self._pool_options.items())))
        pool = _pools.get(key)
        if pool is None:
            with _lock:
                pool = _pools.get(key)
                if pool is None:
                    pool = _pools[key] = self._pool_class.from_url(self._servers[index], **self._pool_options)
        return pool

    def get_client(self, key=None, *, write=False):
        pool = self._get_connection_pool(write)
        client = _clients.get(id(pool))
        if client is None:
            with _lock:
                client = _clients.setdefault(id(pool), self._client(connection_pool=pool))
        return client


class RedisCache(django_redis.RedisCache):
    def __init__(self, server, params):
        super().__init__(server, params)
        self._class = RedisCacheClient
