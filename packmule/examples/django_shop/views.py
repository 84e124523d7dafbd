"""The shop's pages: the products with a Reprice button, and a run's live bar."""

from __future__ import annotations

import uuid

from django.db import transaction
from django.http import HttpRequest, HttpResponse, HttpResponseNotAllowed, HttpResponseRedirect
from django.shortcuts import render

from packmule.examples.django_shop.models import Product, Repricing, Summary
from packmule.examples.django_shop.runners import Reprice

RUN_PREFIX = "reprice-"


def shop_runs_only(request: HttpRequest, run_name: str, action: str) -> bool:
    """The ``allow`` hook of the progress URLs: anyone may watch a repricing run (this
    shop's own), and nothing else; the admin's pages show every run, to staff."""
    return action == "view" and run_name.startswith(RUN_PREFIX)


def index(request: HttpRequest) -> HttpResponse:
    return render(request, "django_shop/index.html", {
        "products": Product.objects.count(), "repricings": Repricing.objects.order_by("-pk")[:10],
        "summaries": {s.run: s for s in Summary.objects.order_by("-pk")[:10]}})


def reprice(request: HttpRequest) -> HttpResponse:
    """Record the request and queue its run when the transaction commits."""
    if request.method != "POST":
        return HttpResponseNotAllowed(["POST"])
    percent = int(request.POST.get("percent") or 5)
    runner = Reprice(f"{RUN_PREFIX}{uuid.uuid4().hex[:8]}")
    with transaction.atomic():
        Repricing.objects.create(run=runner.name, percent=percent)
        runner.enqueue_on_commit("all_products")  # queued after COMMIT: its job finds the row
    return HttpResponseRedirect(f"/runs/{runner.name}/")


def run(request: HttpRequest, name: str) -> HttpResponse:
    return render(request, "django_shop/run.html", {
        "name": name, "summary": Summary.objects.filter(run=name).first()})
