"""``python -m packmule.examples.django_shop setup``: the database, 100 products, an admin login."""

from __future__ import annotations

import secrets
from typing import Any

from django.conf import settings
from django.contrib.auth import get_user_model
from django.core.management import call_command
from django.core.management.base import BaseCommand

from packmule.examples.django_shop.models import Product

PRODUCTS = 100


class Command(BaseCommand):
    help = "Create the example's SQLite database, seed 100 products and an admin user (again: nothing new)."

    def handle(self, *args: Any, **options: Any) -> None:
        call_command("migrate", verbosity=0)
        have = set(Product.objects.values_list("name", flat=True))
        Product.objects.bulk_create([Product(name=f"product-{i:03d}", list_cents=100 * i, price_cents=100 * i)
                                     for i in range(1, PRODUCTS + 1) if f"product-{i:03d}" not in have])
        self.stdout.write(f"database {settings.DATABASES['default']['NAME']}: {Product.objects.count()} products")
        users = get_user_model().objects
        if not users.filter(username="admin").exists():
            password = secrets.token_urlsafe(9)
            users.create_superuser("admin", password=password)
            self.stdout.write(f"admin login (for /admin/packmule/): admin / {password}")
        self.stdout.write("next: python -m packmule.examples.django_shop runserver   (then http://127.0.0.1:8000/)")
