"""The report wing: everything that reads finished results and presents them.

``tables`` (the Table object and its builders), ``timing`` (Table 3's measurements), ``figures``,
``stats`` (significance marks) and ``page`` (the HTML results page). Nothing here trains a model; the
modules read ``results/`` through :mod:`amisbench.store` and :mod:`amisbench.results`.
"""
