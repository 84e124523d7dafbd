from django.contrib import admin
from django.urls import include, path

from packmule.contrib.django.views import progress_urls
from packmule.examples.django_shop import views

urlpatterns = [
    path("", views.index),
    path("reprice", views.reprice),
    path("runs/<str:name>/", views.run),
    path("progress/", include(progress_urls(allow=views.shop_runs_only))),  # what <packmule-progress> reads
    path("admin/", admin.site.urls),  # /admin/packmule/: every run, for staff
]
