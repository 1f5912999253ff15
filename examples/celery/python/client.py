"""Charges a customer through the cage and prints the charge, as any Celery client would."""
from tasks import app

charge = app.send_task("billing.charge", args=["alice", "12.50"], kwargs={"currency": "EUR"})
print(charge.get(timeout=10))
try:
    app.send_task("billing.charge", args=["bob", "-3"]).get(timeout=10)
except Exception as e:
    print(f"{type(e).__name__}: {e}")
