"""When and where: fire times of schedules, the NUMA topology, the allocator."""
