from django.db import migrations, models


class Migration(migrations.Migration):
    dependencies = [
        ("elections", "0008_failover_gaps_flapping_metrics"),
    ]

    operations = [
        migrations.AddField(
            model_name="agent",
            name="clock_skew",
            field=models.FloatField(blank=True, null=True),
        ),
        migrations.AddField(
            model_name="membership",
            name="lease_late",
            field=models.BooleanField(default=False),
        ),
    ]
