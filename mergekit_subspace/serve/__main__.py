"""`python -m mergekit_subspace.serve STORE --base MODEL ...` (the same as `mergekit-subspace serve`)."""

from mergekit_subspace.serve.command import serve

if __name__ == "__main__":
    serve(prog_name="python -m mergekit_subspace.serve")
