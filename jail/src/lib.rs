//! Spawning a device process in namespaces with pivot_root, rlimits and no capabilities.
