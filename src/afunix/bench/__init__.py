"""``python -m afunix bench``: what afunix buys over the stdlib, and how close it comes to C.

matrix.py declares the matrix as data, workloads.py holds each workload once
per implementation, runner.py runs and verifies a cell in two pinned
processes, report.py prints and writes the results, cli.py ties them up.
"""
