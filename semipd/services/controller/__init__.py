"""The controller process: front door, resident memory, allocator, supervisor."""
