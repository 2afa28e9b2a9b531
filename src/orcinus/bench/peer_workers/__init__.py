"""Scripts run by other engines' interpreters (peers.py). They live in a folder of their own
because a script's folder comes first on its sys.path: beside orcinus/bench/profile.py, vLLM's
`import cProfile` found that file instead of the standard library's `profile`."""
