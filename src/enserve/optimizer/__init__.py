"""The allocator: device inventory, profiling, worst-fit-decreasing placement, neighbourhood search."""
