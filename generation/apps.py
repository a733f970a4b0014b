from django.apps import AppConfig


class GenerationConfig(AppConfig):
    name = "generation"
    verbose_name = "Generation"

    def ready(self):
        from generation import scheduler, workflow_schema
        from gpu import capacity

        # gpu/ asks about jobs through these, never by importing generation.
        capacity.register_demand(active_jobs=scheduler.active_jobs_on, jobs_waiting=scheduler.gpu_jobs_waiting,
                                 workflow_models=workflow_schema.graph_models)
        capacity.capacity_changed.connect(scheduler.on_capacity_changed, dispatch_uid="scheduler-capacity")
        # Loaded here, before django-q2 forks its workers: a worker's first job would otherwise pay
        # for importing the runner and its clients (boto3 alone takes ~70 ms).
        from django_q.signals import post_spawn

        from generation import tasks

        post_spawn.connect(tasks.warm_worker, dispatch_uid="warm-worker")
