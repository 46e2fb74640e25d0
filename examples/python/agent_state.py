#!/usr/bin/env python3
"""Reading and changing agent state through an agentmount mount, with the standard library only.

    python3 agent_state.py MOUNTPOINT sessions
    python3 agent_state.py MOUNTPOINT goal GOAL_ID
    python3 agent_state.py MOUNTPOINT set-progress GOAL_ID PERCENT
    python3 agent_state.py MOUNTPOINT attach FILE

Every change is an ordinary file write; agentmount validates it on close and turns it into
an atomic upsert of the platform's store. A refused write raises OSError with the errno
(EINVAL for bad JSON or values) and the reason is in MOUNTPOINT/.errors.
"""
import json
import os
import shutil
import sys


def sessions(mnt):
    """Each session's id, state and task."""
    d = os.path.join(mnt, "sessions")
    for name in sorted(os.listdir(d)):
        if name.endswith(".json"):
            with open(os.path.join(d, name)) as f:
                s = json.load(f)
            print(f"{s['id']}  {s['state']:<14} {s['task']}")


def goal(mnt, goal_id):
    with open(os.path.join(mnt, "goals", goal_id + ".json")) as f:
        g = json.load(f)
    done = sum(1 for s in g.get("sessions", []) if s.get("state") == "verified")
    print(f"{g['id']}: {g['description']} [{g['status']}] {g.get('progress', 0)}% "
          f"({done}/{len(g.get('sessions', []))} sessions verified)")


def set_progress(mnt, goal_id, percent):
    path = os.path.join(mnt, "goals", goal_id + ".json")
    with open(path) as f:
        g = json.load(f)
    g["progress"] = int(percent)
    # Write a scratch file and rename it over the record: readers see the old goal or the
    # new one, never half of it. (Writing the record directly works too.)
    tmp = os.path.join(mnt, "goals", "." + goal_id + ".tmp")
    try:
        with open(tmp, "w") as f:
            json.dump(g, f, indent=2)
        os.replace(tmp, path)
    except OSError:
        # Refused (the reason is in .errors): leave no scratch file behind for grep -r or
        # cp -r to pick up.
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    goal(mnt, goal_id)


def attach(mnt, src):
    label = os.path.basename(src)
    dst = os.path.join(mnt, "attachments", label)
    shutil.copyfile(src, dst)
    hexid = os.readlink(dst)
    print(f"{label} -> sha256:{hexid} ({os.getxattr(dst, 'user.media_type').decode()})")


COMMANDS = {"sessions": sessions, "goal": goal, "set-progress": set_progress, "attach": attach}


def main(argv):
    if any(a in ("-h", "--help") for a in argv[1:]):
        print(__doc__.strip())
        return
    if len(argv) < 3 or argv[2] not in COMMANDS:
        print(__doc__.strip(), file=sys.stderr)
        sys.exit(2)
    mnt, cmd, args = argv[1], argv[2], argv[3:]
    try:
        COMMANDS[cmd](mnt, *args)
    except TypeError:
        print(__doc__.strip(), file=sys.stderr)
        sys.exit(2)
    except OSError as e:
        sys.exit(f"{cmd}: {e} (see {os.path.join(mnt, '.errors')})")


if __name__ == "__main__":
    main(sys.argv)
