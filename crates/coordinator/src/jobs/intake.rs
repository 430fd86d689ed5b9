//! The dataspace side of jobs: `submit-job` and `cancel-job` records, checked (a submitter is
//! untrusted: sizes are bounded, malformed records refused with a reason) and handed to the
//! keeper; the answers (`job-accepted`, `job-refused`, `job-cancelled`) are asserted in the
//! facet of the request they answer, so they last as long as it does.

use std::sync::Arc;

use nixspace_planner::job_history::JobAttribute;
use nixspace_protocol::build;
use preserves::ValueImpl;
use preserves_schema::{Parse, Unparse};
use syndicate::actor::{Account, Activation, AnyValue, Cap, FacetRef};
use syndicate::enclose;
use syndicate_macros::during;
use tokio::sync::mpsc::UnboundedSender;

use super::Request;

/// The most attributes a job may have.
pub const MAX_JOB_ATTRIBUTES: usize = 5_000;
/// The longest job name, attribute name or submission name taken, in bytes.
pub const MAX_NAME_BYTES: usize = 512;
/// The longest `.drv` path taken, in bytes.
const MAX_DRV_BYTES: usize = 400;

/// Where an answer to a request goes: the facet of the request's assertion.
#[derive(Clone)]
pub(crate) struct Answer {
    facet: FacetRef,
    ds: Arc<Cap>,
}

impl Answer {
    /// Assert `record` in the request's facet (nothing if the request is gone).
    pub(crate) fn give<R: Unparse<Arc<Cap>> + Send + 'static>(&self, record: R) {
        let ds = Arc::clone(&self.ds);
        self.facet
            .activate(&Account::new(None, None), None, move |t| {
                ds.assert(t, &record);
                Ok(())
            });
    }
}

/// A checked submission.
pub(crate) struct Submission {
    /// The submitter's name for it.
    pub submission: String,
    /// The job's name.
    pub name: String,
    /// Its attributes.
    pub attributes: Vec<JobAttribute>,
}

/// Why a submission is refused, in words for the submitter.
fn check(
    submission: &str,
    name: &str,
    attributes: &AnyValue,
    store_dir: &str,
) -> Result<Vec<JobAttribute>, String> {
    if submission.is_empty() || submission.len() > MAX_NAME_BYTES {
        return Err(format!(
            "the submission's name must have 1 to {MAX_NAME_BYTES} bytes"
        ));
    }
    if name.is_empty() || name.len() > MAX_NAME_BYTES {
        return Err(format!(
            "a job's name must have 1 to {MAX_NAME_BYTES} bytes"
        ));
    }
    if !attributes.is_sequence() {
        return Err("a job's attributes must be a sequence of <job-attribute name drv>".into());
    }
    let count = attributes.len();
    if count == 0 || count > MAX_JOB_ATTRIBUTES {
        return Err(format!(
            "a job has 1 to {MAX_JOB_ATTRIBUTES} attributes, this one has {count}"
        ));
    }
    let mut taken: Vec<JobAttribute> = Vec::with_capacity(count);
    let mut names = std::collections::BTreeSet::new();
    for value in attributes.iter() {
        let a = build::JobAttribute::parse(&value)
            .map_err(|_| "an attribute is not <job-attribute name drv>".to_owned())?;
        if a.name.is_empty() || a.name.len() > MAX_NAME_BYTES {
            return Err(format!(
                "an attribute's name must have 1 to {MAX_NAME_BYTES} bytes"
            ));
        }
        let in_store = a
            .drv
            .strip_prefix(store_dir)
            .and_then(|rest| rest.strip_prefix('/'))
            .is_some_and(|base| !base.is_empty() && !base.contains('/'));
        if a.drv.len() > MAX_DRV_BYTES || !in_store || !a.drv.ends_with(".drv") {
            return Err(format!(
                "attribute {}: {:?} is not a .drv path in {store_dir}",
                a.name, a.drv
            ));
        }
        if !names.insert(a.name.clone()) {
            return Err(format!("attribute {} is named twice", a.name));
        }
        taken.push(JobAttribute {
            name: a.name,
            drv: a.drv,
        });
    }
    Ok(taken)
}

/// Observe submissions and cancellations on `ds` and hand them to the keeper.
pub(crate) fn observe(
    t: &mut Activation,
    ds: &Arc<Cap>,
    store_dir: String,
    keeper: UnboundedSender<Request>,
) {
    enclose!((ds, keeper) during!(t, ds, <submit-job $submission $name $attributes>,
    |t: &mut Activation| {
        // A submission that is not a string cannot be answered (the answer names it).
        let Some(submission) = submission.as_string().map(|s| s.into_owned()) else {
            tracing::warn!(?submission, "ignoring a submit-job whose submission is not a string");
            return Ok(());
        };
        let answer = Answer { facet: t.facet_ref(), ds: Arc::clone(&ds) };
        let checked = match name.as_string() {
            Some(name) => check(&submission, &name, &attributes, &store_dir)
                .map(|attributes| (name.into_owned(), attributes)),
            None => Err("a job's name must be a string".to_owned()),
        };
        match checked {
            Ok((name, attributes)) => {
                // The facet waits for the keeper's answer.
                let _keep_alive = t.prevent_inert_check();
                let submission = Submission { submission, name, attributes };
                let _ = keeper.send(Request::Submit { submission, answer });
            }
            Err(reason) => {
                tracing::warn!(%submission, %reason, "refusing a job");
                ds.assert(t, &build::JobRefused { submission, reason });
            }
        }
        Ok(())
    }));
    enclose!((ds, keeper) during!(t, ds, <cancel-job $job>, |t: &mut Activation| {
        // A job that is not a number cannot be answered (the answer names it).
        let Some(Ok(job)) = job.as_i64() else {
            tracing::warn!(?job, "ignoring a cancel-job whose job is not a number");
            return Ok(());
        };
        let answer = Answer { facet: t.facet_ref(), ds: Arc::clone(&ds) };
        let _keep_alive = t.prevent_inert_check();
        let _ = keeper.send(Request::Cancel { job, answer });
        Ok(())
    }));
}

#[cfg(test)]
mod tests {
    use super::*;

    fn attributes(list: &[(&str, &str)]) -> AnyValue {
        AnyValue::new(
            list.iter()
                .map(|(name, drv)| {
                    build::JobAttribute {
                        name: (*name).to_owned(),
                        drv: (*drv).to_owned(),
                    }
                    .unparse()
                })
                .collect::<Vec<AnyValue>>(),
        )
    }

    #[test]
    fn malformed_submissions_are_refused_with_a_reason() {
        let good = attributes(&[("a", "/nix/store/x-a.drv")]);
        assert!(check("s", "job", &good, "/nix/store").is_ok());
        let refused = |attrs: &AnyValue| check("s", "job", attrs, "/nix/store").unwrap_err();
        assert!(refused(&attributes(&[])).contains("1 to"));
        assert!(refused(&attributes(&[("a", "/etc/passwd")])).contains("not a .drv path"));
        assert!(refused(&attributes(&[("a", "/nix/store/../x.drv/y.drv")])).contains("not a .drv"));
        assert!(refused(&attributes(&[
            ("a", "/nix/store/x-a.drv"),
            ("a", "/nix/store/x-b.drv")
        ]))
        .contains("named twice"));
        assert!(refused(&AnyValue::new("not a list")).contains("sequence"));
        assert!(check("", "job", &good, "/nix/store").is_err());
    }
}
