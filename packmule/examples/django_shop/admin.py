from django.contrib import admin

from packmule.examples.django_shop.models import Product, Repricing, Summary

admin.site.register(Product, list_display=["name", "list_cents", "price_cents"])
admin.site.register(Repricing, list_display=["run", "percent", "requested_at"])
admin.site.register(Summary, list_display=["run", "products", "total_cents", "written_at"])
