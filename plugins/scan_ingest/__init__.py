"""canton-scan-airflow: copy a Canton Network Scan API ledger into partitioned Parquet on GCS.

The package lives under ``plugins/`` so Airflow puts it on ``sys.path``; it is listed in
``plugins/.airflowignore`` because Airflow would otherwise exec each module as a plugin.
"""

__version__ = "0.1.0"
