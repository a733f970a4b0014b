"""The generate and jobs routes."""

from ninja import Router

router = Router(tags=["generation"])
