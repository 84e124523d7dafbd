"""The shop's rows: products, and one summary per repricing run."""

from django.db import models


class Product(models.Model):
    name = models.CharField(max_length=100, unique=True)
    list_cents = models.IntegerField()
    price_cents = models.IntegerField()

    def __str__(self) -> str:
        return str(self.name)


class Repricing(models.Model):
    """A request to reprice, recorded in the transaction that queues its run."""

    run = models.CharField(max_length=200, unique=True)
    percent = models.IntegerField()
    requested_at = models.DateTimeField(auto_now_add=True)

    def __str__(self) -> str:
        return str(self.run)


class Summary(models.Model):
    """What a run did, written by its continuation: one row per run (``run`` is unique)."""

    run = models.CharField(max_length=200, unique=True)
    products = models.IntegerField()
    total_cents = models.IntegerField()
    written_by_pid = models.IntegerField()
    written_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        verbose_name_plural = "summaries"

    def __str__(self) -> str:
        return str(self.run)
