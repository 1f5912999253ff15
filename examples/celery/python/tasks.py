"""The Python side of the billing example: the Celery app (its routes send billing.* to the
queue the cage consumes) and the tasks the Python workers keep (mail.receipt)."""
import os

from celery import Celery

BROKER = os.environ.get("BROKER", "redis://127.0.0.1:6379/0")
app = Celery("shop", broker=BROKER, backend=os.environ.get("BACKEND", BROKER))
app.conf.task_routes = {"billing.*": {"queue": "billing"}, "mail.*": {"queue": "mail"}}


@app.task(name="mail.receipt")
def receipt(customer, charge_id, cents, currency):
    line = f"receipt for {customer}: {cents / 100:.2f} {currency} (charge {charge_id})"
    print(line, flush=True)
    return line
