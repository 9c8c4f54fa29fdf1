"""Placeholder main job until the host layer lands."""

if __name__ == "__main__":
    print("lazycluster_tasks skeleton")
