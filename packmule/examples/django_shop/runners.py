"""The shop's runner: imported by the packmule app at start, in the server and its workers."""

from __future__ import annotations

import os
import time

import packmule
from packmule.examples.django_shop.models import Product, Repricing, Summary


class Reprice(packmule.Runner):
    """``all_products`` (the root job) fans out ``one`` over every product, then
    ``summarize`` writes the run's summary: 1 + 100 jobs for 100 products."""

    record_return_values = True

    def all_products(self) -> packmule.JobRef:
        percent = Repricing.objects.get(run=self.name).percent  # (committed before this job was queued)
        ids = list(Product.objects.order_by("pk").values_list("pk", flat=True))
        jobs = self.enqueue_each("one", ids, percent)
        return self.deferred_result("summarize", jobs)  # type: ignore[no-any-return]

    def one(self, pk: int, percent: int) -> int:
        """The product's new price (from its list price: a retried job writes the same)."""
        time.sleep(float(os.environ.get("SHOP_PAUSE", "0.05")))  # s per product: long enough to watch the bar
        product = Product.objects.get(pk=pk)
        product.price_cents = product.list_cents * (100 + percent) // 100
        product.save(update_fields=["price_cents"])
        return int(product.price_cents)

    def summarize(self, prices: list[int]) -> int:
        """Write the run's summary row: once, even if this job is retried (``run`` is unique)."""
        Summary.objects.get_or_create(run=self.name, defaults={
            "products": len(prices), "total_cents": sum(prices), "written_by_pid": os.getpid()})
        return sum(prices)
