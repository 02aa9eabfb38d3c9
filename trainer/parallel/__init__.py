"""Parallel layouts over process groups.

``dims`` owns the layout arithmetic and every process group; ``comm`` the
instrumented collectives; ``attention`` and ``moe`` the SP/TP attention and
EP/TP expert halves of the macro module (``block``); ``model`` shards a
reference model onto the n ranks of a group; ``launch`` starts local ranks.
"""
