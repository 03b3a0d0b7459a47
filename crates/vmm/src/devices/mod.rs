//! Port-I/O devices and the bus that routes vCPU exits to them.
//!
//! The PIC, IOAPIC, LAPIC and PIT live in KVM (in-kernel irqchip); the VMM emulates:
//! COM1 (16550, vm-superio), the power-off port 0xf4 (isa-debug-exit compatible, as QEMU's
//! `-device isa-debug-exit,iobase=0xf4`), the i8042 reset line, and empty PCI config space.
mod serial;

pub use serial::{ConsoleOut, Serial, SerialState, SerialStateError, COM1_BASE};

use std::sync::Mutex;

/// Port of the power-off device: a byte written here powers the VM off with that code.
pub const EXIT_PORT: u16 = 0xf4;
const I8042_DATA: u16 = 0x60;
const I8042_CMD: u16 = 0x64;
const I8042_RESET: u8 = 0xfe;

/// What a port write asks of the VM.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IoAction {
    None,
    PowerOff(u8),
    Reset,
}

/// Routes port I/O to the VMM's devices.
pub struct IoBus {
    serial: Mutex<Serial>,
}

/// State of every VMM-emulated device (version 1). `IoBus::save` destructures the bus
/// exhaustively: a device added to the bus without a state here does not compile.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct DevicesState {
    pub version: u32,
    pub serial: SerialState,
}

/// Version of [`DevicesState`].
pub const DEVICES_STATE_VERSION: u32 = 1;

impl IoBus {
    pub fn new(serial: Serial) -> Self {
        IoBus {
            serial: Mutex::new(serial),
        }
    }

    pub fn save(&self) -> DevicesState {
        let IoBus { serial } = self;
        let serial = serial.lock().unwrap_or_else(|e| e.into_inner()).save();
        DevicesState {
            version: DEVICES_STATE_VERSION,
            serial,
        }
    }

    /// Builds the bus and its devices from saved state.
    pub fn from_state(
        s: &DevicesState,
        serial_irq: vmm_sys_util::eventfd::EventFd,
        console: ConsoleOut,
    ) -> Result<Self, SerialStateError> {
        if s.version != DEVICES_STATE_VERSION {
            return Err(SerialStateError::Version(s.version));
        }
        let DevicesState { version: _, serial } = s;
        Ok(IoBus {
            serial: Mutex::new(Serial::from_state(serial, serial_irq, console)?),
        })
    }

    fn serial(&self) -> std::sync::MutexGuard<'_, Serial> {
        // A poisoned lock means a vCPU thread panicked mid-write; the device state is still
        // usable for output, so keep going rather than take the VM down.
        self.serial.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn write(&self, port: u16, data: &[u8]) -> IoAction {
        let Some(&v) = data.first() else {
            return IoAction::None;
        };
        match port {
            p if (COM1_BASE..COM1_BASE + 8).contains(&p) => {
                self.serial().write((p - COM1_BASE) as u8, v);
                IoAction::None
            }
            EXIT_PORT => IoAction::PowerOff(v),
            I8042_CMD if v == I8042_RESET => IoAction::Reset,
            _ => IoAction::None,
        }
    }

    pub fn read(&self, port: u16, data: &mut [u8]) {
        match port {
            p if (COM1_BASE..COM1_BASE + 8).contains(&p) => {
                let v = self.serial().read((p - COM1_BASE) as u8);
                data.fill(0);
                if let Some(b) = data.first_mut() {
                    *b = v;
                }
            }
            I8042_DATA | I8042_CMD => data.fill(0),
            // Nothing here: floating bus.
            _ => data.fill(0xff),
        }
    }

    /// Drops an unfinished console line (the VM continues elsewhere and prints it there).
    pub fn discard_console_partial(&self) {
        self.serial().discard_partial();
    }

    /// Writes any partial console line out (on VM exit).
    pub fn flush_console(&self) {
        self.serial().flush();
    }
}
