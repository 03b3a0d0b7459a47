//! `ferry demo`: boots the test guest and shows its heartbeat.
use crate::cli::DemoArgs;
use anyhow::Result;

pub fn main(_args: DemoArgs) -> Result<()> {
    anyhow::bail!("not yet")
}
