"""The Python twin of the web app's ``POST /receive`` for ``make bench``: Flask under gunicorn,
doing the same work per request: insert the job's row in PostgreSQL, publish it with Celery,
answer 202 with its id. ``BENCH_DATABASE_URL`` and ``BENCH_BROKER_URL`` say where.
"""

import json
import os
import uuid

from flask import Flask, request
from psycopg_pool import ConnectionPool

from py_app import app as celery_app

# Its table `jobs` is created by the harness (bench.FLASK_JOBS_TABLE) before gunicorn starts:
# the workers would race to create it.
web = Flask(__name__)
pool = ConnectionPool(os.environ["BENCH_DATABASE_URL"], min_size=1, max_size=4, open=True)
QUEUE = os.environ.get("BENCH_QUEUE", "celery")


@web.post("/receive")
def receive():
    body = request.get_json(force=True, silent=True)
    if not isinstance(body, dict) or not isinstance(body.get("task"), str):
        return {"error": "a JSON object with a task name is required"}, 422
    task_id = str(uuid.uuid4())
    args = body.get("args", [])
    with pool.connection() as connection:
        connection.execute("INSERT INTO jobs (task_id, task_name, args) VALUES (%s, %s, %s)",
                           (task_id, body["task"], json.dumps(args)))
    celery_app.send_task(body["task"], args, task_id=task_id, queue=QUEUE)
    return {"task_id": task_id, "status_url": f"/status/{task_id}"}, 202

