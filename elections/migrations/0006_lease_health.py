from django.db import migrations, models


class Migration(migrations.Migration):
    dependencies = [
        ("elections", "0005_suspect_claims"),
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
