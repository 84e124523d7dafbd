"""packmule for Django: ``packmule.contrib.django.tasks.PackmuleBackend`` runs
``django.tasks`` tasks on packmule's workers."""
