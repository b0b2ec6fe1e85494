"""Drop-in namespaces for code written against other libraries: ``posthoc.compat.laplace`` for laplace-torch 0.3.

Ported code changes only its imports (``from posthoc.compat.laplace import Laplace`` for ``from laplace import
Laplace``); this is the top layer of posthoc and nothing inside posthoc imports it.
"""
