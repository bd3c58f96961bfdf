"""Native CPU kernels: C++ sources compiled for the running machine on first use."""
