//! Nix's logging events under one build, between a worker's `nix-daemon` and the dataspace.
//!
//! During `BuildDerivation` the daemon sends its log as frames: the build's activity
//! (`actBuild`), results of it (log lines, and `resultSetPhase` from a builder's `@nix
//! {"action":"setPhase",…}` lines), activities the builder starts under it (a download) with
//! their results and end, and activities of its own (realising, copying) the client does not
//! need from a worker. [`BuildEvents`] keeps what belongs to the build, as [`BuildLog`]s.
//!
//! The activities travel as `<build-activity drv worker event>` records ([`to_record`]), where
//! activity 0 is the build activity (each frontend opens its own for the step) and parent 0
//! the build activity too. [`from_record`] reads them back bounded: known activity and result
//! types only, at most [`MAX_FIELDS`] fields and [`MAX_TEXT_BYTES`] per text, integers that
//! fit Nix's 64 bits; whoever sent the record is untrusted.

use std::collections::HashSet;

use nixspace_nix_protocol::stderr::{activity_type, result_type, Field};
use nixspace_nix_protocol::LogEvent;
use nixspace_protocol::build;
use preserves::SignedInteger;

use crate::strip_ansi;

/// The most activities one build may have open under its build activity at once; further
/// starts are dropped, and with them their results and end.
pub const MAX_OPEN_ACTIVITIES: usize = 64;
/// The most fields one relayed event may carry (Nix's carry at most 4).
pub const MAX_FIELDS: usize = 16;
/// The longest text (an activity's text, a string field) a relayed event may carry, in bytes.
pub const MAX_TEXT_BYTES: usize = 4096;
/// The most verbose level Nix has (`lvlVomit`).
const MAX_LEVEL: u64 = 7;

/// A piece of a build's log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BuildLog {
    /// A line of the build's output or a message of the daemon, without its newline.
    Line(String),
    /// A result of the build activity (activity 0), or an activity under it starting,
    /// getting a result or stopping (never a [`LogEvent::Message`]).
    Activity(LogEvent),
}

impl BuildLog {
    /// The bytes it counts against a log cap: a line's and its newline, an event's texts
    /// and 8 per number.
    pub fn size(&self) -> u64 {
        let fields = |fields: &[Field]| -> usize {
            fields
                .iter()
                .map(|f| match f {
                    Field::Int(_) => 8,
                    Field::String(s) => s.len() + 8,
                })
                .sum()
        };
        let size = match self {
            BuildLog::Line(line) => line.len() + 1,
            BuildLog::Activity(LogEvent::StartActivity {
                text, fields: f, ..
            }) => 40 + text.len() + fields(f),
            BuildLog::Activity(LogEvent::Result { fields: f, .. }) => 24 + fields(f),
            BuildLog::Activity(LogEvent::StopActivity { .. }) => 8,
            BuildLog::Activity(LogEvent::Message(m)) => m.len() + 1,
        };
        size as u64
    }
}

/// Sorts the logging frames of one `BuildDerivation` (see the module docs).
#[derive(Debug, Default)]
pub struct BuildEvents {
    /// The daemon's id of the build activity, once started.
    build: Option<u64>,
    /// The daemon's ids of the open activities under it.
    open: HashSet<u64>,
}

impl BuildEvents {
    /// Pass what belongs to the build in `event` on to `out`.
    pub fn sort(&mut self, event: LogEvent, out: &mut impl FnMut(BuildLog)) {
        if let Some(line) = event.build_log_line() {
            out(BuildLog::Line(line.to_owned()));
            return;
        }
        match event {
            LogEvent::Message(message) => {
                for line in message.lines() {
                    out(BuildLog::Line(strip_ansi(line)));
                }
            }
            LogEvent::StartActivity {
                id, activity_type, ..
            } if activity_type == activity_type::BUILD && self.build.is_none() => {
                self.build = Some(id);
            }
            LogEvent::StartActivity { id, parent, .. } => {
                let Some(parent) = self.ours(parent) else {
                    return;
                };
                if id == 0 || self.open.len() >= MAX_OPEN_ACTIVITIES || !self.open.insert(id) {
                    return;
                }
                out(BuildLog::Activity(event.renumbered(id, parent)));
            }
            LogEvent::Result { id, .. } => {
                if let Some(id) = self.ours(id) {
                    out(BuildLog::Activity(event.renumbered(id, 0)));
                }
            }
            LogEvent::StopActivity { id } => {
                if self.open.remove(&id) {
                    out(BuildLog::Activity(LogEvent::StopActivity { id }));
                }
            }
        }
    }

    /// The relayed number of the daemon's activity `id` if it is the build's (0) or under
    /// it (its own).
    fn ours(&self, id: u64) -> Option<u64> {
        if self.build == Some(id) {
            Some(0)
        } else {
            self.open.contains(&id).then_some(id)
        }
    }
}

/// Why a `<build-activity …>` record's event cannot be relayed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InvalidActivity {
    /// A number does not fit Nix's unsigned 64 bits.
    #[error("{0} is not a 64-bit unsigned number")]
    Number(&'static str),
    /// An activity or result type Nix does not have.
    #[error("unknown {what} {value}")]
    Type {
        /// Which type.
        what: &'static str,
        /// Its value.
        value: u64,
    },
    /// Activity 0 (the build activity) cannot start or stop, nor a level exceed Nix's.
    #[error("{0}")]
    Shape(&'static str),
    /// More fields or longer text than allowed.
    #[error("over the bounds: at most {MAX_FIELDS} fields of at most {MAX_TEXT_BYTES} bytes")]
    TooBig,
}

/// The record of `event` (a [`BuildLog::Activity`]) of `drv`'s build on `worker`; none for a
/// message.
pub fn to_record(drv: &str, worker: &str, event: &LogEvent) -> Option<build::BuildActivity> {
    let int = |n: u64| SignedInteger::from(n);
    let fields = |fields: &[Field]| {
        fields
            .iter()
            .map(|f| match f {
                Field::Int(n) => build::ActivityField::Int(int(*n)),
                Field::String(s) => build::ActivityField::Text(s.clone()),
            })
            .collect()
    };
    let event = match event {
        LogEvent::Message(_) => return None,
        LogEvent::StartActivity {
            id,
            level,
            activity_type,
            text,
            fields: f,
            parent,
        } => build::ActivityEvent::Start {
            activity: int(*id),
            parent: int(*parent),
            activity_type: int(*activity_type),
            level: int(*level),
            text: text.clone(),
            fields: fields(f),
        },
        LogEvent::Result {
            id,
            result_type,
            fields: f,
        } => build::ActivityEvent::Result {
            activity: int(*id),
            result_type: int(*result_type),
            fields: fields(f),
        },
        LogEvent::StopActivity { id } => build::ActivityEvent::Stop { activity: int(*id) },
    };
    Some(build::BuildActivity {
        drv: drv.to_owned(),
        worker: worker.to_owned(),
        event,
    })
}

/// The logging event a record's `event` carries, checked against the bounds (see the module
/// docs).
pub fn from_record(event: &build::ActivityEvent) -> Result<LogEvent, InvalidActivity> {
    match event {
        build::ActivityEvent::Start {
            activity,
            parent,
            activity_type,
            level,
            text,
            fields,
        } => {
            let id = number(activity, "activity")?;
            let activity_type = number(activity_type, "activity type")?;
            let level = number(level, "level")?;
            if id == 0 {
                return Err(InvalidActivity::Shape(
                    "activity 0 is the build: it cannot start",
                ));
            }
            if level > MAX_LEVEL {
                return Err(InvalidActivity::Shape("no such verbosity level"));
            }
            if !(activity_type == activity_type::UNKNOWN
                || (activity_type::COPY_PATH..=activity_type::BUILD_WAITING)
                    .contains(&activity_type))
            {
                return Err(InvalidActivity::Type {
                    what: "activity type",
                    value: activity_type,
                });
            }
            if text.len() > MAX_TEXT_BYTES {
                return Err(InvalidActivity::TooBig);
            }
            Ok(LogEvent::StartActivity {
                id,
                level,
                activity_type,
                text: text.clone(),
                fields: from_fields(fields)?,
                parent: number(parent, "parent")?,
            })
        }
        build::ActivityEvent::Result {
            activity,
            result_type,
            fields,
        } => {
            let result_type = number(result_type, "result type")?;
            if !(result_type::FILE_LINKED..=result_type::POST_BUILD_LOG_LINE).contains(&result_type)
            {
                return Err(InvalidActivity::Type {
                    what: "result type",
                    value: result_type,
                });
            }
            Ok(LogEvent::Result {
                id: number(activity, "activity")?,
                result_type,
                fields: from_fields(fields)?,
            })
        }
        build::ActivityEvent::Stop { activity } => match number(activity, "activity")? {
            0 => Err(InvalidActivity::Shape(
                "activity 0 is the build: it cannot stop",
            )),
            id => Ok(LogEvent::StopActivity { id }),
        },
    }
}

fn number(n: &SignedInteger, what: &'static str) -> Result<u64, InvalidActivity> {
    u64::try_from(n).map_err(|_| InvalidActivity::Number(what))
}

fn from_fields(fields: &[build::ActivityField]) -> Result<Vec<Field>, InvalidActivity> {
    if fields.len() > MAX_FIELDS {
        return Err(InvalidActivity::TooBig);
    }
    fields
        .iter()
        .map(|f| match f {
            build::ActivityField::Int(n) => number(n, "field").map(Field::Int),
            build::ActivityField::Text(s) if s.len() > MAX_TEXT_BYTES => {
                Err(InvalidActivity::TooBig)
            }
            build::ActivityField::Text(s) => Ok(Field::String(s.clone())),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const BUILD_ID: u64 = 7 << 32 | 5;

    fn start(id: u64, parent: u64, kind: u64) -> LogEvent {
        LogEvent::StartActivity {
            id,
            level: 3,
            activity_type: kind,
            text: format!("activity {id}"),
            fields: vec![Field::String("x".into())],
            parent,
        }
    }

    fn result(id: u64, kind: u64, field: Field) -> LogEvent {
        LogEvent::Result {
            id,
            result_type: kind,
            fields: vec![field],
        }
    }

    fn sorted(events: Vec<LogEvent>) -> Vec<BuildLog> {
        let mut sorter = BuildEvents::default();
        let mut out = Vec::new();
        for event in events {
            sorter.sort(event, &mut |log| out.push(log));
        }
        out
    }

    #[test]
    fn the_builds_results_and_the_activities_under_it_are_kept_the_daemons_own_are_not() {
        let phase = Field::String("buildPhase".into());
        let out = sorted(vec![
            start(1, 0, activity_type::BUILDS),
            result(1, result_type::PROGRESS, Field::Int(0)),
            start(BUILD_ID, 0, activity_type::BUILD),
            result(
                BUILD_ID,
                result_type::BUILD_LOG_LINE,
                Field::String("hi".into()),
            ),
            result(BUILD_ID, result_type::SET_PHASE, phase.clone()),
            start(9, BUILD_ID, activity_type::FILE_TRANSFER),
            result(9, result_type::PROGRESS, Field::Int(3)),
            start(10, 9, activity_type::FILE_TRANSFER),
            LogEvent::StopActivity { id: 10 },
            LogEvent::StopActivity { id: 9 },
            LogEvent::StopActivity { id: 9 },
            LogEvent::StopActivity { id: BUILD_ID },
            LogEvent::StopActivity { id: 1 },
            LogEvent::Message("\x1b[31mwarning\x1b[0m\nsecond".into()),
        ]);
        assert_eq!(
            out,
            vec![
                BuildLog::Line("hi".into()),
                BuildLog::Activity(result(0, result_type::SET_PHASE, phase)),
                BuildLog::Activity(start(9, 0, activity_type::FILE_TRANSFER)),
                BuildLog::Activity(result(9, result_type::PROGRESS, Field::Int(3))),
                BuildLog::Activity(start(10, 9, activity_type::FILE_TRANSFER)),
                BuildLog::Activity(LogEvent::StopActivity { id: 10 }),
                BuildLog::Activity(LogEvent::StopActivity { id: 9 }),
                BuildLog::Line("warning".into()),
                BuildLog::Line("second".into()),
            ]
        );
    }

    #[test]
    fn open_activities_under_a_build_are_bounded() {
        let mut events = vec![start(BUILD_ID, 0, activity_type::BUILD)];
        let over = MAX_OPEN_ACTIVITIES as u64 + 10;
        events.extend((1..=over).map(|id| start(id, BUILD_ID, activity_type::FILE_TRANSFER)));
        events.push(result(over, result_type::PROGRESS, Field::Int(1)));
        events.push(result(1, result_type::PROGRESS, Field::Int(1)));
        let out = sorted(events);
        // The first MAX_OPEN_ACTIVITIES starts, then only the result of an open one.
        assert_eq!(out.len(), MAX_OPEN_ACTIVITIES + 1);
        assert_eq!(
            out.last(),
            Some(&BuildLog::Activity(result(
                1,
                result_type::PROGRESS,
                Field::Int(1)
            )))
        );
    }

    #[test]
    fn events_go_through_their_record_unchanged() {
        for event in [
            start(9, 0, activity_type::FILE_TRANSFER),
            result(0, result_type::SET_PHASE, Field::String("p".into())),
            result(9, result_type::PROGRESS, Field::Int(u64::MAX)),
            LogEvent::StopActivity { id: 9 },
        ] {
            let record = to_record("d.drv", "w", &event).unwrap();
            assert_eq!(from_record(&record.event), Ok(event));
        }
        assert_eq!(
            to_record("d.drv", "w", &LogEvent::Message("m".into())),
            None
        );
    }

    #[test]
    fn records_out_of_bounds_are_refused() {
        let record = |event: LogEvent| to_record("d.drv", "w", &event).unwrap().event;
        // Positive control: the same shapes within bounds pass.
        let text = "x".repeat(MAX_TEXT_BYTES);
        let ok = result(0, result_type::SET_PHASE, Field::String(text.clone()));
        assert!(from_record(&record(ok)).is_ok());
        let long = result(0, result_type::SET_PHASE, Field::String(text + "x"));
        assert_eq!(from_record(&record(long)), Err(InvalidActivity::TooBig));
        let many = LogEvent::Result {
            id: 0,
            result_type: result_type::PROGRESS,
            fields: vec![Field::Int(1); MAX_FIELDS + 1],
        };
        assert_eq!(from_record(&record(many)), Err(InvalidActivity::TooBig));
        let unknown = result(0, 99, Field::Int(1));
        assert!(matches!(
            from_record(&record(unknown)),
            Err(InvalidActivity::Type { value: 99, .. })
        ));
        assert!(from_record(&record(start(0, 0, activity_type::FILE_TRANSFER))).is_err());
        assert!(from_record(&record(LogEvent::StopActivity { id: 0 })).is_err());
        let negative = build::ActivityEvent::Stop {
            activity: SignedInteger::from(-1i64),
        };
        assert_eq!(
            from_record(&negative),
            Err(InvalidActivity::Number("activity"))
        );
    }
}
